"""The behaviour predictor and its versioned artifact directory (torch only, no Spark).

Model: ``embedding ⊕ standardized numeric features -> MLP -> one head per
task``; binary tasks (purchase, churn) give one logit, ``next_category`` one
logit per class. With ``config.rec`` set, a two-tower recommendation head
(:mod:`userlens.models.recommend`) shares the model's input and is trained in
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
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from userlens.errors import UserlensError

FORMAT_VERSION = 1
BINARY_TASKS = ("purchase", "churn")
MULTICLASS_TASKS = ("next_category",)


@dataclass(frozen=True)
class FeatureSpec:
    """How raw numeric features become model inputs: log1p, then (x - mean) / std."""

    names: list[str]
    mean: list[float]
    std: list[float]
    embedding_dim: int
    embed_model_id: str

    def transform(self, raw: np.ndarray) -> np.ndarray:
        x = np.log1p(np.maximum(raw.astype(np.float64), 0.0))
        return ((x - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)


@dataclass(frozen=True)
class ModelConfig:
    tasks: list[str]
    classes: list[str]  # next_category class names (index = label)
    hidden: list[int]
    dropout: float
    input_dim: int
    # the last numeric_dim inputs (the standardized numeric features) also feed every head directly
    # (a "wide" linear path beside the deep one), so the model starts where a logistic regression does
    numeric_dim: int = 0
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    rec: dict[str, Any] | None = None  # RecConfig as a dict: the two-tower recommendation head

    def head_sizes(self) -> dict[str, int]:
        return {t: (len(self.classes) if t in MULTICLASS_TASKS else 1) for t in self.tasks}


class BehaviourModel(nn.Module):
    """Shared MLP trunk with one linear head per task (wide & deep when ``numeric_dim`` > 0)."""

    def __init__(self, config: ModelConfig, catalogue: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__()
        from userlens.models.recommend import RecConfig, TwoTower

        self.rec = TwoTower(RecConfig(**config.rec), *(catalogue or (None, None))) if config.rec else None
        layers: list[nn.Module] = []
        width = config.input_dim
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.numeric_dim = config.numeric_dim
        self.heads = nn.ModuleDict({task: nn.Linear(width + config.numeric_dim, size)
                                    for task, size in config.head_sizes().items()})

    def forward(self, x: torch.Tensor, rec: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Task logits; with ``rec`` (hist_idx, hist_w, positive) also ``recommend``: the in-batch
        logits and targets of the two-tower head (inside forward, so DDP syncs its gradients)."""
        h = self.trunk(x)
        if self.numeric_dim:
            h = torch.cat([h, x[:, -self.numeric_dim:]], dim=1)
        out: dict[str, Any] = {task: head(h).squeeze(-1) if head.out_features == 1 else head(h)
                               for task, head in self.heads.items()}
        if rec is not None and self.rec is not None:
            users = self.rec.user_vectors(x, rec["hist_idx"], rec["hist_w"])
            out["recommend"] = self.rec.in_batch(users, rec["positive"], rec["hist_idx"], rec["hist_w"])
        return out

    @torch.no_grad()
    def set_linear_heads(self, linear: dict[str, dict[str, list]]) -> None:
        """Make every head named in ``linear`` that linear model of the numeric features: its weights on
        them and its bias set to ``linear[task]`` ("weight": classes x numeric_dim on the standardized
        features, "bias": classes), its weights on the trunk zero, so the trunk has no effect on it.
        Classes beyond the given rows get weight 0 and a bias of -20."""
        for task, head in self.heads.items():
            if task not in linear:
                continue
            weight = torch.as_tensor(linear[task]["weight"], dtype=head.weight.dtype)
            bias = torch.as_tensor(linear[task]["bias"], dtype=head.bias.dtype)
            if weight.shape[1] != self.numeric_dim or weight.shape[0] > head.out_features:
                raise ValueError(f"linear head for {task}: weight {tuple(weight.shape)} does not fit a head of "
                                 f"{head.out_features} outputs over {self.numeric_dim} numeric features")
            head.weight.zero_()
            head.weight[:weight.shape[0], head.in_features - self.numeric_dim:] = weight
            head.bias.fill_(-20.0)
            head.bias[:bias.shape[0]] = bias


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
    """The training loss: the sum of :func:`task_losses`, plus the recommendation head's in-batch
    softmax (times ``rec_weight``) when present."""
    from userlens.models.recommend import rec_loss

    total = sum(task_losses(outputs, labels).values(), torch.zeros(()))
    if "recommend" in outputs:
        total = total + rec_weight * rec_loss(*outputs["recommend"])
    return total


@torch.inference_mode()
def predict(model: BehaviourModel, x: np.ndarray, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """Probabilities per task: (n,) for binary tasks, (n, classes) for next_category."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    device = next(model.parameters()).device
    for start in range(0, len(x), batch_size):
        out = model(torch.from_numpy(x[start:start + batch_size]).to(device))
        for task, logits in out.items():
            prob = torch.softmax(logits, -1) if task in MULTICLASS_TASKS else torch.sigmoid(logits)
            parts.setdefault(task, []).append(prob.float().cpu().numpy())
    return {task: np.concatenate(chunks) for task, chunks in parts.items()}


# --------------------------------------------------------------------------- artifact files


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file through pyarrow's filesystems (local, s3://, gs://, hdfs://, abfs://)."""
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffix: str = ".parquet") -> list[str]:
    """Files under a directory (not recursive), sorted; full URIs/paths."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return [prefix + n if prefix and not n.startswith(prefix) else n for n in names]


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n").encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


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

    def inputs(self, embedding: np.ndarray, raw_features: np.ndarray) -> np.ndarray:
        return np.concatenate([embedding.astype(np.float32), self.features.transform(raw_features)], axis=1)


def write_catalogue(uri: str, item_ids: list[str], embeddings: np.ndarray, log_q: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = embeddings.shape
    table = pa.table({"item_id": pa.array(item_ids, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(
                          pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1)), d),
                      "log_q": pa.array(np.asarray(log_q, np.float64))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue())


def read_catalogue(uri: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(item ids, embeddings (n, d) float32, log q) of a catalogue file or folder of Parquet files,
    sorted by item id (the head's item index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [uri] if uri.endswith(".parquet") else list_files(uri)
    parts = []
    for f in files:
        fs, path = _fs(f)
        with fs.open_input_file(path) as handle:
            parts.append(pq.read_table(handle))
    table = pa.concat_tables(parts, promote_options="permissive").sort_by("item_id") if parts else None
    if table is None or table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32), np.zeros(0)
    n = table.num_rows
    emb = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    log_q = (table.column("log_q").to_numpy() if "log_q" in table.column_names else np.zeros(n))
    return table.column("item_id").to_pylist(), emb.reshape(n, -1).astype(np.float32), log_q


def write_artifact(path: str, config: ModelConfig, features: FeatureSpec, state: dict[str, Any],
                   metrics: dict[str, Any], catalogue: tuple[list[str], np.ndarray, np.ndarray] | None = None) -> None:
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
        raise UserlensError(f"{path}: model format version {found} is not supported; this userlens reads "
                            f"version {FORMAT_VERSION} (retrain with `userlens train`)")
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
    return Artifact(path, path.rstrip("/").rsplit("/", 1)[-1], config, features, model, metrics, item_ids)
