"""The sequential user encoder: a causal transformer over a user's item history (SASRec family),
trained with cross-entropy over the whole catalogue, every position a target (torch only, no Spark).

* Items are 0..n_items-1; inside the model token 0 is padding, so item i is token i + 1.
* An item's vector is a learned id vector plus, where item texts are given, their frozen text
  embedding (the embed stage's encoder, once per item) standardised and projected: a rare item still
  gets a meaningful vector, and the same matrix is the input embedding and the output layer (tied).
* With item texts, ``id_dropout`` drops the id vectors of a random share of the items in each
  training step, so the text projection learns to carry an item alone (what a new item has).
* Sequences are right-padded in length-sorted buckets, so a batch is only as long as its longest
  history; causal attention means padding never reaches a real position.
* :func:`fit` trains with early stopping on a validation callback (higher is better) and keeps the
  best state; with no callback it runs a fixed number of epochs (the count chosen on validation).
  Past ``full_softmax_items`` items the loss is a sampled softmax with the logQ correction.

Cost per epoch: O(events x dim^2) for the encoder plus O(events x n_items x dim) for the full-catalogue
softmax (the sampled softmax: O(events x negatives x dim)); memory O(n_items x dim).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequentialConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 1
    max_len: int = 50  # newest items of a history the encoder reads
    dropout: float = 0.5
    id_dropout: float = 0.0  # share of items whose id vector is dropped in a training step (text alone)
    batch_size: int = 128
    learning_rate: float = 1e-3
    max_epochs: int = 200
    patience: int = 5  # validations without improvement before stopping
    validate_every: int = 2  # epochs between validations
    full_softmax_items: int = 200_000  # above: sampled softmax with logQ correction
    negatives: int = 4096  # sampled softmax: negatives per batch
    seed: int = 13

    @classmethod
    def of(cls, recommend: Any, seed: int) -> SequentialConfig:
        """From the ``train.recommend`` settings (the train stage and ``userlens evaluate`` alike)."""
        return cls(
            dim=recommend.dim,
            layers=recommend.layers,
            heads=recommend.heads,
            max_len=recommend.history,
            dropout=recommend.dropout,
            id_dropout=recommend.id_dropout,
            batch_size=recommend.batch_size,
            learning_rate=recommend.learning_rate,
            max_epochs=recommend.max_epochs,
            patience=recommend.patience,
            seed=seed,
        )


class _Block(nn.Module):
    """A pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], is_causal=True, dropout_p=self.p if self.training else 0.0
        )
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class SequentialEncoder(nn.Module):
    """Item histories -> user vectors in the item space; ``item_matrix()`` is (n_items, dim)."""

    known: torch.Tensor  # a buffer: (n_items + 1, 1), 0 for items whose id vector is never learned

    text: torch.Tensor | None

    def __init__(
        self, n_items: int, config: SequentialConfig, text: np.ndarray | None = None, unknown: np.ndarray | None = None
    ) -> None:
        """``text``: (n_items, d) item-text embeddings; ``unknown``: items with no interaction to learn an id
        vector from (new items): they are represented by their text alone and left out of the training
        softmax."""
        super().__init__()
        self.config, self.n_items = config, n_items
        known = np.ones(n_items + 1, np.float32)
        if unknown is not None:
            known[1:][np.asarray(unknown, bool)] = 0.0
        self.register_buffer("known", torch.from_numpy(known)[:, None])
        d = config.dim
        self.ids = nn.Embedding(n_items + 1, d, padding_idx=0)
        nn.init.normal_(self.ids.weight, std=0.02)
        with torch.no_grad():
            self.ids.weight[0].zero_()
        self.pos = nn.Embedding(config.max_len, d)
        nn.init.normal_(self.pos.weight, std=0.02)
        if text is not None:
            t = torch.as_tensor(np.asarray(text, np.float32))
            self.register_buffer("text", (t - t.mean(0)) / t.std(0).clamp(min=1e-6))
            self.text_proj = nn.Linear(t.shape[1], d)
            nn.init.normal_(self.text_proj.weight, std=0.02 / math.sqrt(t.shape[1] / d))
            nn.init.zeros_(self.text_proj.bias)
        else:
            self.text = None
        self.emb_ln, self.emb_drop = nn.LayerNorm(d), nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(d, config.heads, config.dropout) for _ in range(config.layers))
        self.ln = nn.LayerNorm(d)

    def token_matrix(self) -> torch.Tensor:
        """(n_items + 1, dim): row 0 padding, row i + 1 item i (id vector + projected text). In training,
        with item texts and ``config.id_dropout`` > 0, that share of the items (drawn per step, the same
        in the inputs and the softmax) lose their id vector, so the text projection must carry an item on
        its own, as it does for a new item (DropoutNet, Volkovs et al., NeurIPS 2017)."""
        keep = self.known
        if self.training and self.text is not None and self.config.id_dropout > 0:
            drop = torch.rand(keep.shape, device=keep.device) < self.config.id_dropout
            keep = keep * (~drop).to(keep.dtype)
        w = self.ids.weight * keep
        if self.text is not None:
            w = w + F.pad(self.text_proj(self.text), (0, 0, 1, 0))
        return w

    def encode(self, seq: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded tokens -> (B, L, dim) hidden states."""
        x = tokens[seq] * math.sqrt(self.config.dim) + self.pos.weight[: seq.shape[1]][None]
        x = self.emb_drop(self.emb_ln(x))
        for block in self.blocks:
            x = block(x)
        return self.ln(x)

    @torch.no_grad()
    def user_vectors(
        self, histories: Sequence[np.ndarray], batch: int = 1024, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(len(histories), dim): the hidden state after each history's newest item (an empty history:
        zeros). ``tokens``: :meth:`token_matrix`, when the caller already has it."""
        self.eval()
        tokens = self.token_matrix() if tokens is None else tokens
        out = torch.zeros(len(histories), self.config.dim)
        keep = self.config.max_len
        order = np.argsort([min(len(h), keep) for h in histories], kind="stable")
        for start in range(0, len(order), batch):
            rows = [r for r in order[start : start + batch] if len(histories[r])]
            if not rows:
                continue
            seqs = [np.asarray(histories[r][-keep:], np.int64) + 1 for r in rows]
            lengths = torch.as_tensor([len(s) for s in seqs])
            seq = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
            for i, s in enumerate(seqs):
                seq[i, : len(s)] = torch.from_numpy(s)
            hidden = self.encode(seq, tokens)
            out[torch.as_tensor(rows)] = hidden[torch.arange(len(seqs)), lengths - 1]
        return out

    @torch.no_grad()
    def item_matrix(self) -> torch.Tensor:
        """(n_items, dim), detached (a view of the id weights keeps requires_grad even under no_grad)."""
        return self.token_matrix()[1:].detach()

    def scores(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(len(histories), n_items) next-item scores."""
        return (self.user_vectors(histories) @ self.item_matrix().T).numpy()


def _batches(lengths: np.ndarray, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches of similar length (sorted with noise, chunked, shuffled)."""
    order = np.argsort(lengths + rng.random(len(lengths)))
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    rng.shuffle(chunks)
    return chunks


def fit(
    model: SequentialEncoder,
    histories: Sequence[np.ndarray],
    epochs: int | None = None,
    validate: Callable[[SequentialEncoder], float] | None = None,
    item_counts: np.ndarray | None = None,
) -> dict[str, float]:
    """Train on each history (every position predicts the next item). With ``validate``: until
    ``config.patience`` validations without improvement, restoring the best state; else ``epochs``
    epochs. ``item_counts`` (training frequencies) for the sampled softmax's logQ correction.
    Returns best_epoch, best (validation value), epochs_run, seconds."""
    cfg = model.config
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    seqs = [np.asarray(h[-(cfg.max_len + 1) :], np.int64) + 1 for h in histories if len(h) >= 2]
    if not seqs:
        raise ValueError("no history with at least two items to learn from")
    lengths = np.array([len(s) for s in seqs])
    counts = np.ones(model.n_items) if item_counts is None else np.asarray(item_counts, float) + 1.0
    log_q = torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    limit = epochs if validate is None else cfg.max_epochs
    assert limit is not None, "give epochs, or a validation callback"
    best, best_epoch, bad, best_state = -math.inf, 0, 0, None
    started = time.perf_counter()
    epoch = 0
    for epoch in range(1, limit + 1):
        model.train()
        total, tokens_seen = 0.0, 0
        for idx in _batches(lengths, cfg.batch_size, rng):
            batch = [seqs[i] for i in idx]
            seq = torch.zeros(len(batch), max(len(s) for s in batch), dtype=torch.long)
            for i, s in enumerate(batch):
                seq[i, : len(s)] = torch.from_numpy(s)
            loss = sequence_loss(model, seq, log_q)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n_targets = int((seq[:, 1:] > 0).sum())
            total += float(loss.detach()) * n_targets
            tokens_seen += n_targets
        if validate is None:
            continue
        if epoch % cfg.validate_every == 0 or epoch == limit:
            value = validate(model)
            log.info("sequential: epoch %d loss %.4f valid %.5f", epoch, total / max(tokens_seen, 1), value)
            if value > best:
                best, best_epoch, bad = value, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "best_epoch": float(best_epoch or epoch),
        "best": float(best),
        "epochs_run": float(epoch),
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------
# in the pipeline: the behaviour model's recommendation head
# --------------------------------------------------------------------------
def chronological(hist_idx: np.ndarray, pad: int, last: np.ndarray | None = None) -> torch.Tensor:
    """(B, L) right-padded token sequences (item + 1, 0 = padding) from newest-first history indices
    (``pad`` = none) and, optionally, one more item per row appended as the newest (``pad``: none)."""
    rows = []
    for r in range(len(hist_idx)):
        items = hist_idx[r][hist_idx[r] != pad][::-1]
        if last is not None and last[r] != pad:
            items = np.append(items, last[r])
        rows.append(items + 1)
    width = max([len(x) for x in rows] + [1])
    seq = torch.zeros(len(rows), width, dtype=torch.long)
    for r, items in enumerate(rows):
        seq[r, : len(items)] = torch.from_numpy(items.astype(np.int64))
    return seq


def sequence_loss(model: SequentialEncoder, seq: torch.Tensor, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of every position's next item over the catalogue (with ``log_q``, item log
    frequencies, and more than ``full_softmax_items`` items: a sampled softmax with the logQ correction);
    the mean over targets, and 0 when ``seq`` has none, with a (zero) gradient for every parameter: under
    DDP every parameter then has a gradient at every step, and no search for unused ones is needed."""
    inputs, targets = seq[:, :-1], seq[:, 1:]
    tokens = model.token_matrix()
    keep = targets > 0
    if not keep.any():
        return sum((p.sum() for p in model.parameters()), tokens.sum()) * 0.0
    hidden = model.encode(inputs, tokens)[keep]
    y = targets[keep] - 1
    items = tokens[1:]
    cfg = model.config
    if model.n_items > cfg.full_softmax_items and log_q is not None:
        negatives = torch.multinomial(log_q.exp(), cfg.negatives, replacement=True)
        candidates = torch.cat([y, negatives])
        logits = hidden @ items[candidates].T - log_q[candidates][None, :]
        return F.cross_entropy(logits, torch.arange(len(y), device=logits.device))
    logits = (hidden @ items.T).masked_fill(model.known[1:, 0] == 0, -torch.inf)
    return F.cross_entropy(logits, y)


SCORE_BYTES = 256 * 2**20  # top_items: the (users x items) float32 score block it holds at once


@torch.inference_mode()
def top_items(
    model: SequentialEncoder,
    hist_idx: np.ndarray,
    pad: int,
    exclude: np.ndarray,
    k: int,
    max_score_bytes: int = SCORE_BYTES,
    fusion: Any = None,
) -> np.ndarray:
    """(U, k) top item indices per user from newest-first history indices (``pad`` = none), best first;
    ``exclude`` (U, M) item indices never recommended (``pad`` or -1 = none); -1 fills a row that runs out.
    Scores are the user vector (after the newest item) times every item vector, then ``torch.topk``: no
    user x item cross join. Users go in blocks of ``max_score_bytes // (4 * n_items)`` (at least one), so
    memory is the model, its (n_items, dim) item matrix and one score block, whatever U is.

    ``fusion`` (:class:`userlens.models.als.Fusion`, with a weight above 0): the block's scores are the
    head's plus the weight times ALS's (the user folded in from the same history, the excluded items as
    the bought ones), each standardised per user over the items that may be recommended; a few more
    blocks of memory."""
    if fusion is not None and fusion.weight > 0:
        return top_items_by_weight(model, hist_idx, pad, exclude, k, fusion.als, [fusion.weight], max_score_bytes)[
            fusion.weight
        ]
    return top_items_by_weight(model, hist_idx, pad, exclude, k, None, [0.0], max_score_bytes)[0.0]


@torch.inference_mode()
def top_items_by_weight(
    model: SequentialEncoder,
    hist_idx: np.ndarray,
    pad: int,
    exclude: np.ndarray,
    k: int,
    als: Any,
    weights: Sequence[float],
    max_score_bytes: int = SCORE_BYTES,
) -> dict[float, np.ndarray]:
    """:func:`top_items` for each ALS weight of ``weights`` (0: the head alone) from one pass over the
    users: the head's and ALS's scores are computed once per block (how the train stage chooses the
    weight)."""
    model.eval()
    tokens = model.token_matrix()
    items = tokens[1:]
    k = min(k, model.n_items)
    out = {w: np.full((len(hist_idx), k), -1, np.int64) for w in weights}
    fused = als is not None and any(w > 0 for w in weights)
    block = max(1, max_score_bytes // (4 * max(1, model.n_items)))
    for start in range(0, len(hist_idx), block):
        hist = hist_idx[start : start + block]
        histories = [h[h != pad][::-1] for h in hist]
        scores = model.user_vectors(histories, tokens=tokens) @ items.T
        ex = torch.as_tensor(exclude[start : start + block], dtype=torch.long)
        valid = (ex >= 0) & (ex != pad)
        rows = torch.arange(len(scores)).unsqueeze(1).expand_as(ex)
        head_z = als_z = None
        if fused:
            from userlens.models.als import standardised

            excluded = torch.zeros(scores.shape, dtype=torch.bool)
            excluded[rows[valid], ex[valid]] = True
            head_z = standardised(scores, excluded)
            als_z = standardised(als.scores(hist, pad, exclude[start : start + block]), excluded)
            del excluded
        scores[rows[valid], ex[valid]] = -torch.inf
        for w in weights:
            ranked = scores if w == 0 or head_z is None or als_z is None else head_z + w * als_z
            best = torch.topk(ranked, k, dim=1)
            out[w][start : start + len(hist)] = torch.where(torch.isinf(best.values), -1, best.indices).numpy()
        del scores, head_z, als_z
    return out
