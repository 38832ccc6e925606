"""Two-tower recommendation head (torch + numpy + pyarrow, no Spark).

Why this shape (DESIGN.md, modeling notes): a frozen encoder used zero-shot is
far below popularity; what works is a trained head over *item-text* embeddings
of the user's history, plus learned item-id vectors and biases, trained with an
in-batch softmax that corrects for popularity (logQ).

* **User tower:** ``[dense user inputs ⊕ pooled history text ⊕ pooled history ids]
  -> MLP -> dim``. Dense inputs are the behaviour model's input (user text
  embedding ⊕ standardized numeric features) in the pipeline, nothing in
  :class:`TextTwoTower`. The history is the user's newest distinct items, each
  weighted ``0.5 ** (age_days / half_life)``.
* **Item tower:** ``Linear(item text embedding) + id vector``, plus a scalar
  bias. Items unknown at training time (new in the catalogue) get the padding
  id (zero vector, zero bias): they are ranked by their text alone.
* **Repeat term:** ``+ repeat * h_u(i)``, the recency weight of item i in the
  user's own history (0 when absent), with ``repeat`` learned: people come
  back to what they viewed or carted, which a dot product of pooled vectors
  captures poorly (implicit ALS and co-occurrence baselines get it for free).
* **Loss:** in-batch softmax over the batch's positive items with
  ``logit - log q(item)`` (q = the item's share of training positives); a
  repeated item is not a negative of itself.
* **Top-K:** ``U @ V.T + b`` in batches with items to exclude set to -inf, then
  ``torch.topk`` — never a user × item cross join.

The catalogue the tower was trained with (ids, text embeddings, log q) is part
of the model artifact (``items.parquet``), not of the state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class RecConfig:
    n_items: int  # the training catalogue; index n_items is the padding id
    item_dim: int  # item text embedding width
    user_dim: int  # dense user inputs (0: history only)
    dim: int = 64
    hidden: int = 256
    history: int = 50
    half_life_days: float = 14.0

    @property
    def pad(self) -> int:
        return self.n_items


class TwoTower(nn.Module):
    # buffers (register_buffer in __init__), declared for the type checker
    item_text: torch.Tensor
    log_q: torch.Tensor

    def __init__(self, config: RecConfig, item_text: np.ndarray | None = None, log_q: np.ndarray | None = None) -> None:
        super().__init__()
        self.config = config
        n, d = config.n_items, config.item_dim
        text = np.zeros((n + 1, d), np.float32)
        if item_text is not None:
            text[:n] = item_text
        q = np.zeros(n + 1, np.float32)
        if log_q is not None:
            q[:n] = log_q
        # catalogue data, not weights: saved in the artifact's items.parquet
        self.register_buffer("item_text", torch.from_numpy(text), persistent=False)
        self.register_buffer("log_q", torch.from_numpy(q), persistent=False)
        self.item_proj = nn.Linear(d, config.dim)
        self.item_id = nn.Embedding(n + 1, config.dim, padding_idx=n)
        self.item_bias = nn.Embedding(n + 1, 1, padding_idx=n)
        nn.init.normal_(self.item_id.weight, std=0.01)
        nn.init.zeros_(self.item_bias.weight)
        with torch.no_grad():
            self.item_id.weight[n].zero_()
        self.user_mlp = nn.Sequential(
            nn.Linear(config.user_dim + d + config.dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.dim)
        )
        self.repeat = nn.Parameter(torch.tensor(1.0))

    def set_catalogue(self, item_text: np.ndarray, log_q: np.ndarray | None = None) -> None:
        n = self.config.n_items
        if item_text.shape != (n, self.config.item_dim):
            raise ValueError(f"catalogue shape {item_text.shape} != ({n}, {self.config.item_dim})")
        self.item_text[:n] = torch.from_numpy(np.ascontiguousarray(item_text, np.float32))
        if log_q is not None:
            self.log_q[:n] = torch.from_numpy(np.asarray(log_q, np.float32))

    def user_vectors(self, dense: torch.Tensor | None, hist_idx: torch.Tensor, hist_w: torch.Tensor) -> torch.Tensor:
        """(B, dim) from dense inputs (B, user_dim), history indices (B, L) and weights (B, L)."""
        w = hist_w.unsqueeze(-1)
        norm = w.sum(1).clamp_min(1e-6)
        text = (self.item_text[hist_idx] * w).sum(1) / norm
        ids = (self.item_id(hist_idx) * w).sum(1) / norm
        parts = [text, ids] if dense is None or self.config.user_dim == 0 else [dense, text, ids]
        return self.user_mlp(torch.cat(parts, dim=1))

    def item_vectors(self, text: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors (N, dim), biases (N,)) of items with these text embeddings and training ids (pad: unknown)."""
        return self.item_proj(text) + self.item_id(idx), self.item_bias(idx).squeeze(-1)

    def in_batch(
        self,
        users: torch.Tensor,
        positives: torch.Tensor,
        hist_idx: torch.Tensor | None = None,
        hist_w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (P, P) and targets (P,) over the rows with a positive (index < pad), logQ-corrected,
        with the repeat term when the history is given."""
        has = positives < self.config.pad
        u, p = users[has], positives[has]
        v, b = self.item_vectors(self.item_text[p], p)
        logits = u @ v.T + b - self.log_q[p]
        if hist_idx is not None and hist_w is not None:
            # h[r, j] = weight of item p[j] in row r's history
            h = ((hist_idx[has].unsqueeze(1) == p.view(1, -1, 1)) * hist_w[has].unsqueeze(1)).sum(-1)
            logits = logits + self.repeat * h
        same = (p.unsqueeze(0) == p.unsqueeze(1)) & ~torch.eye(len(p), dtype=torch.bool, device=p.device)
        return logits.masked_fill(same, float("-inf")), torch.arange(len(p), device=p.device)


def rec_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if len(targets) < 2:  # no negatives in the batch
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits, targets)


@torch.inference_mode()
def top_k(
    users: torch.Tensor,
    items: tuple[torch.Tensor, torch.Tensor],
    exclude: np.ndarray,
    k: int,
    batch_size: int = 4096,
    repeat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> np.ndarray:
    """Top-``k`` candidate positions per user (U, k), best first; ``exclude`` (U, M) holds candidate
    positions to leave out (-1 = none); -1 fills a row when fewer than ``k`` candidates remain.
    ``items`` = (vectors, biases) of the candidates. ``repeat`` = (history indices (U, L) into the
    candidates, pad = len(candidates); their weights (U, L); the learned scale): the repeat term."""
    vectors, biases = items
    k = min(k, len(biases))
    out = np.empty((len(users), k), np.int64)
    for start in range(0, len(users), batch_size):
        scores = users[start : start + batch_size] @ vectors.T + biases
        if repeat is not None:
            idx, w, scale = repeat
            extra = torch.zeros(len(scores), len(biases) + 1, dtype=scores.dtype, device=scores.device)
            extra.scatter_add_(1, idx[start : start + batch_size], w[start : start + batch_size].to(scores.dtype))
            scores = scores + scale * extra[:, :-1]
        mask = torch.from_numpy(exclude[start : start + batch_size]).to(scores.device)
        rows = torch.arange(len(scores), device=scores.device).unsqueeze(1).expand_as(mask)
        keep = mask >= 0
        scores[rows[keep], mask[keep]] = float("-inf")
        best = torch.topk(scores, k, dim=1)
        out[start : start + batch_size] = torch.where(torch.isinf(best.values), -1, best.indices).cpu().numpy()
    return out


# --------------------------------------------------------------------------- arrays from lists


def padded_indices(values: np.ndarray, lengths: np.ndarray, lookup: Any, width: int, pad: int) -> np.ndarray:
    """(n, width) int64 matrix of ``lookup.get_indexer(values)`` per row (first ``width`` values), ``pad``
    where a row is shorter or a value is unknown. ``values`` is the flat list data, ``lengths`` per row."""
    n = len(lengths)
    out = np.full((n, width), pad, np.int64)
    if len(values) == 0:
        return out
    idx = lookup.get_indexer(values).astype(np.int64)
    idx[idx < 0] = pad
    rows = np.repeat(np.arange(n), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(len(values)) - starts
    keep = pos < width
    out[rows[keep], pos[keep]] = idx[keep]
    return out


def list_column(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, lengths) of a pyarrow list array (nulls count as empty lists)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), lengths


def recency_weights(ages: np.ndarray, idx: np.ndarray, pad: int, half_life_days: float) -> np.ndarray:
    w = np.power(0.5, np.maximum(ages, 0) / half_life_days).astype(np.float32)
    w[idx == pad] = 0.0
    return w


def sample_positive(positives: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """One random non-pad entry per row of (n, M) (pad when the row has none)."""
    valid = positives != pad
    counts = valid.sum(1)
    pick = (rng.random(len(positives)) * np.maximum(counts, 1)).astype(np.int64)
    # the pick-th valid entry: valid entries come first in every row (padded_indices fills from the left,
    # unknown items in the middle become pad too, so rank the valid ones)
    order = np.argsort(~valid, axis=1, kind="stable")
    chosen = positives[np.arange(len(positives)), order[np.arange(len(positives)), pick]]
    return np.where(counts > 0, chosen, pad)


# --------------------------------------------------------------------------- standalone, for `userlens evaluate`


class TextTwoTower:
    """The same two-tower head fitted on a plain interaction log (no Spark, one process), for the
    public-dataset protocols of ``userlens evaluate``: the user is their pooled history only.

    Training pairs are (history before position t, item at t) over each user's chronological sequence
    (the newest ``pairs_per_user`` positions), so the model learns "what comes next"."""

    def __init__(
        self,
        settings: Any,
        seed: int = 13,
        epochs: int = 20,
        batch_size: int = 256,
        learning_rate: float = 2e-3,
        pairs_per_user: int = 20,
    ) -> None:
        self.settings = settings
        self.seed = seed
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.pairs_per_user = pairs_per_user
        rec = settings.train.recommend
        self.dim, self.hidden, self.history, self.half_life = (
            rec.dim,
            rec.hidden,
            rec.history,
            rec.history_half_life_days,
        )
        self.model: TwoTower | None = None

    def _item_text(self, items: list[str], item_texts: Mapping[str, str] | None) -> np.ndarray:
        if not item_texts:
            return np.zeros((len(items), 1), np.float32)
        from userlens.models.encoder import load_encoder

        encoder = load_encoder(self.settings.embed.model)
        texts = [item_texts.get(i) or "" for i in items]
        return np.asarray(encoder.encode(texts), np.float32)

    def fit(self, interactions: Any, item_texts: Mapping[str, str] | None = None) -> "TextTwoTower":
        import pandas as pd

        df = interactions.sort_values(["user", "ts"], kind="stable")
        self.items = sorted(df["item"].astype(str).unique())
        self.lookup = pd.Index(self.items)
        self.sequences = {
            u: (g["item"].astype(str).to_numpy(), g["ts"].to_numpy(np.int64)) for u, g in df.groupby("user", sort=False)
        }
        text = self._item_text(self.items, item_texts)
        counts = np.bincount(self.lookup.get_indexer(df["item"].astype(str)), minlength=len(self.items))
        config = RecConfig(len(self.items), text.shape[1], 0, self.dim, self.hidden, self.history, self.half_life)
        torch.manual_seed(self.seed)
        model = TwoTower(config, text, np.log((counts + 1) / (counts + 1).sum()))
        hist, weights, pos = self._pairs(config)
        if len(pos) < 2:
            raise ValueError("TextTwoTower: fewer than 2 training pairs (users need at least 2 interactions)")
        opt = torch.optim.AdamW(model.parameters(), lr=self.learning_rate, weight_decay=1e-4)
        rng = np.random.default_rng(self.seed)
        for _ in range(self.epochs):
            model.train()
            order = rng.permutation(len(pos))
            for start in range(0, len(order), self.batch_size):
                take = order[start : start + self.batch_size]
                h, w = torch.from_numpy(hist[take]), torch.from_numpy(weights[take])
                loss = rec_loss(*model.in_batch(model.user_vectors(None, h, w), torch.from_numpy(pos[take]), h, w))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        self.model = model
        return self

    def _history(self, items: np.ndarray, ts: np.ndarray, now: int, config: RecConfig) -> tuple[np.ndarray, ...]:
        """Newest distinct items before ``now`` -> (indices (L,), ages in days (L,))."""
        seen: dict[str, int] = {}
        for item, t in zip(items[::-1], ts[::-1]):
            if item not in seen:
                seen[item] = int(t)
            if len(seen) == config.history:
                break
        idx = np.full(config.history, config.pad, np.int64)
        ages = np.zeros(config.history, np.float32)
        if seen:
            keys = list(seen)
            found = self.lookup.get_indexer(keys)
            idx[: len(keys)] = np.where(found >= 0, found, config.pad)
            ages[: len(keys)] = [(now - seen[k]) / 86400.0 for k in keys]
        return idx, ages

    def _pairs(self, config: RecConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hist, weights, pos = [], [], []
        for items, ts in self.sequences.values():
            for t in range(max(1, len(items) - self.pairs_per_user), len(items)):
                idx, ages = self._history(items[:t], ts[:t], int(ts[t]), config)
                hist.append(idx)
                weights.append(recency_weights(ages, idx, config.pad, config.half_life_days))
                pos.append(self.lookup.get_loc(items[t]))
        return (
            np.array(hist, np.int64).reshape(-1, config.history),
            np.array(weights, np.float32).reshape(-1, config.history),
            np.array(pos, np.int64),
        )

    def recommend(
        self, users: Sequence[str], k: int, exclude: Mapping[str, set[str]] | None = None
    ) -> dict[str, list[str]]:
        """Top-``k`` items per user after their whole fitted history; users without history get the
        model's ranking for an empty history (its learned popularity)."""
        if self.model is None:
            raise ValueError("TextTwoTower.recommend before fit")
        config = self.model.config
        hist, weights, masks = [], [], []
        width = max([len(exclude.get(u, ())) for u in users] if exclude else [0]) or 1
        for u in users:
            items, ts = self.sequences.get(u, (np.array([], object), np.array([], np.int64)))
            now = int(ts[-1]) if len(ts) else 0
            idx, ages = self._history(items, ts, now, config)
            hist.append(idx)
            weights.append(recency_weights(ages, idx, config.pad, config.half_life_days))
            row = np.full(width, -1, np.int64)
            if exclude and exclude.get(u):
                found = self.lookup.get_indexer(list(exclude[u]))
                found = found[found >= 0]
                row[: len(found)] = found
            masks.append(row)
        h, w = torch.from_numpy(np.array(hist)), torch.from_numpy(np.array(weights))
        with torch.inference_mode():
            uv = self.model.user_vectors(None, h, w)
            all_idx = torch.arange(config.n_items)
            vectors = self.model.item_vectors(self.model.item_text[: config.n_items], all_idx)
        ranked = top_k(uv, vectors, np.array(masks), k, repeat=(h, w, self.model.repeat.detach()))
        return {u: [self.items[i] for i in row if i >= 0] for u, row in zip(users, ranked)}
