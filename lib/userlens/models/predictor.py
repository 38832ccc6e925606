"""The behaviour predictor and its versioned artifact directory (torch only, no Spark).

Model: ``embedding ⊕ standardized numeric features -> MLP -> one head per
task``; binary tasks (purchase, churn) give one logit, ``next_category`` one
logit per class. With ``config.rec`` set, the sequential recommendation head
(:mod:`userlens.models.sequential`: a causal transformer over the user's item history, item vectors =
learned ids + the catalogue's text embeddings) is trained in
the same DDP run.

Artifact (``<storage.models>/<version>/``)::

    model.pt            state_dict of the best epoch
    model.json          format version, architecture, tasks, classes, embed model id
    feature_spec.json   feature names, transform (log1p) and normalization stats
    metrics.json        test metrics of the model and of the baseline, data counts, DP
    items.parquet       the recommendation head's training catalogue: item_id, embedding, log_q
    test_predictions.npz, baseline_predictions.npz
                        test labels and probabilities per task (``<task>.y``, ``<task>.p``;
                        no user keys), for the report's ROC and calibration curves
    checkpoints/        last.pt, one per epoch (overwritten)

``load_artifact`` refuses a directory written by another format version.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from userlens.errors import UserlensError
from userlens.models.als import read_fusion
from userlens.models.contracts import FORMAT_VERSION, FeatureSpec, ModelConfig, vectors_of
from userlens.models.storage import (
    exists,
    read_bytes,
    read_catalogue,
    read_json,
    write_bytes,
    write_catalogue,
    write_json,
)
from userlens.models.tasks import MULTICLASS_TASKS


class BehaviourModel(nn.Module):
    """Shared MLP trunk with one linear head per task (wide & deep when ``numeric_dim`` > 0)."""

    log_q: torch.Tensor | None

    def __init__(self, config: ModelConfig, catalogue: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__()
        from userlens.models.sequential import SequentialConfig, SequentialEncoder

        self.rec: SequentialEncoder | None = None
        log_q = None  # the catalogue's item log-frequencies (sampled softmax), a buffer
        if config.rec:
            rec = dict(config.rec)
            n_items = rec.pop("n_items")
            text = catalogue[0] if catalogue is not None else np.zeros((n_items, rec.pop("text_dim", 1)), np.float32)
            rec.pop("text_dim", None)
            self.rec = SequentialEncoder(n_items, SequentialConfig(**rec), text)
            if catalogue is not None:
                log_q = torch.as_tensor(np.asarray(catalogue[1], np.float32))
        self.register_buffer("log_q", log_q, persistent=False)
        layers: list[nn.Module] = []
        width = config.input_dim
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.numeric_dim = config.numeric_dim
        self.heads = nn.ModuleDict(
            {task: nn.Linear(width + config.numeric_dim, size) for task, size in config.head_sizes().items()}
        )

    def forward(self, x: torch.Tensor, rec: torch.Tensor | None = None) -> dict[str, Any]:
        """Task logits; with ``rec`` (the users' chronological item sequences, right-padded tokens) also
        ``recommend``: the sequential head's next-item loss (inside forward, so DDP syncs its gradients)."""
        h = self.trunk(x)
        if self.numeric_dim:
            h = torch.cat([h, x[:, -self.numeric_dim :]], dim=1)
        out: dict[str, Any] = {
            task: head(h).squeeze(-1) if head.out_features == 1 else head(h) for task, head in self.heads.items()
        }
        if rec is not None and self.rec is not None:
            from userlens.models.sequential import sequence_loss

            out["recommend"] = sequence_loss(self.rec, rec, self.log_q)
        return out

    @torch.no_grad()
    def set_linear_heads(self, linear: dict[str, dict[str, list]]) -> None:
        """Make every head named in ``linear`` that linear model of the wide inputs (the last ``numeric_dim``
        of the input row: the state embedding where the model reads it, then the standardized numeric
        features): its weights on them and its bias set to ``linear[task]`` ("weight": classes x k, on the
        last k <= numeric_dim inputs, "bias": classes), its other weights zero, so the trunk has no effect on
        it. Classes beyond the given rows get weight 0 and a bias of -20."""
        for task, head in self.heads.items():
            if task not in linear:
                continue
            assert isinstance(head, nn.Linear)  # every head is built as nn.Linear in __init__
            weight = torch.as_tensor(linear[task]["weight"], dtype=head.weight.dtype)
            bias = torch.as_tensor(linear[task]["bias"], dtype=head.bias.dtype)
            if not 0 < weight.shape[1] <= self.numeric_dim or weight.shape[0] > head.out_features:
                raise ValueError(
                    f"linear head for {task}: weight {tuple(weight.shape)} does not fit a head of "
                    f"{head.out_features} outputs over {self.numeric_dim} wide inputs"
                )
            head.weight.zero_()
            head.weight[: weight.shape[0], head.in_features - weight.shape[1] :] = weight
            head.bias.fill_(-20.0)
            head.bias[: bias.shape[0]] = bias


def task_losses(outputs: dict[str, Any], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss per task head: BCE for binary tasks, cross-entropy for classes (label -1 = no label, the sum
    over labelled rows / the batch size, so a task with fewer labels weighs less)."""
    out: dict[str, torch.Tensor] = {}
    for task, logits in outputs.items():
        if task == "recommend":
            continue
        y = labels[task]
        if task in MULTICLASS_TASKS:
            mask = y >= 0
            if mask.any():
                out[task] = nn.functional.cross_entropy(logits[mask], y[mask], reduction="sum") / len(y)
            else:
                # a batch with no label for this task (e.g. an epoch's last, small batch) still touches its
                # head, with a zero gradient: under DDP a head without a gradient on one rank leaves its
                # all-reduce unlaunched there while the other ranks launch theirs, and gloo then pairs the
                # next collective with it (an abort, "Received data size doesn't match expected size")
                out[task] = logits.sum() * 0.0
        else:
            out[task] = nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    return out


def task_loss(outputs: dict[str, Any], labels: dict[str, torch.Tensor], rec_weight: float = 1.0) -> torch.Tensor:
    """The training loss: the sum of :func:`task_losses`, plus the recommendation head's next-item
    cross-entropy (times ``rec_weight``) when present."""
    total = sum(task_losses(outputs, labels).values(), torch.zeros(()))
    if "recommend" in outputs:
        total = total + rec_weight * outputs["recommend"]
    return total


@torch.inference_mode()
def predict(model: BehaviourModel, x: np.ndarray, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """Probabilities per task: (n,) for binary tasks, (n, classes) for next_category."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    device = next(model.parameters()).device
    for start in range(0, len(x), batch_size):
        out = model(torch.from_numpy(x[start : start + batch_size]).to(device))
        for task, logits in out.items():
            prob = torch.softmax(logits, -1) if task in MULTICLASS_TASKS else torch.sigmoid(logits)
            parts.setdefault(task, []).append(prob.float().cpu().numpy())
    return {task: np.concatenate(chunks) for task, chunks in parts.items()}


def predict_batch(artifact: "Artifact", batch: Any) -> dict[str, np.ndarray]:
    """:func:`predict` over an Arrow record batch with the list columns ``embedding``, ``state_embedding``
    (where the model reads the state view; null rows read zeros) and ``features`` (the raw numeric
    features), as the score and explain stages hand them to their Arrow UDFs."""
    n = batch.num_rows
    spec = artifact.features
    emb = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
    raw = batch.column("features").flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
    state = vectors_of(batch.column("state_embedding"), n, spec.state_dim) if "state" in spec.views else None
    return predict(artifact.model, spec.inputs(emb, state, raw))


# --------------------------------------------------------------------------- artifact files


def save_state(uri: str, state: Any) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(uri, buffer.getvalue())


def load_state(uri: str) -> Any:
    return torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=False)


@dataclass
class Artifact:
    path: str
    version: str
    config: ModelConfig
    features: FeatureSpec
    model: BehaviourModel
    metrics: dict[str, Any]

    item_ids: list[str] = field(default_factory=list)  # the recommendation head's training catalogue
    fusion: Any = None  # userlens.models.als.Fusion: the head's scores fused with ALS (None: the head alone)


def write_artifact(
    path: str,
    config: ModelConfig,
    features: FeatureSpec,
    state: dict[str, Any],
    metrics: dict[str, Any],
    catalogue: tuple[list[str], np.ndarray, np.ndarray] | None = None,
) -> None:
    """Weights, configs and metrics; ``model.json`` last, so a complete directory has it."""
    if catalogue is not None:
        write_catalogue(f"{path}/items.parquet", *catalogue)
    save_state(f"{path}/model.pt", state)
    write_json(f"{path}/feature_spec.json", asdict(features))
    write_json(f"{path}/metrics.json", metrics)
    write_json(f"{path}/model.json", asdict(config))


def load_artifact(path: str) -> Artifact:
    """Load a model directory; refuses an incomplete one or another format version."""
    if not exists(f"{path}/model.json"):
        raise UserlensError(f"{path} is not a userlens model directory (no model.json)")
    raw = read_json(f"{path}/model.json")
    found = raw.get("format_version")
    if found != FORMAT_VERSION:
        raise UserlensError(
            f"{path}: model format version {found} is not supported; this userlens reads "
            f"version {FORMAT_VERSION} (retrain with `userlens train`)"
        )
    config = ModelConfig(**raw)
    features = FeatureSpec(**read_json(f"{path}/feature_spec.json"))
    item_ids: list[str] = []
    catalogue = None
    if config.rec:
        item_ids, embeddings, log_q = read_catalogue(f"{path}/items.parquet")
        catalogue = (embeddings, log_q)
    model = BehaviourModel(config, catalogue)
    model.load_state_dict(load_state(f"{path}/model.pt"))
    model.eval()
    metrics = read_json(f"{path}/metrics.json") if exists(f"{path}/metrics.json") else {}
    fusion = read_fusion(path) if config.rec else None
    return Artifact(path, path.rstrip("/").rsplit("/", 1)[-1], config, features, model, metrics, item_ids, fusion)
