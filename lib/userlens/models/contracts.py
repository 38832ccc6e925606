"""What crosses a process or a file boundary between the Spark side and the training processes:
frozen, picklable dataclasses with a format version (no torch, no Spark)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from userlens.models.tasks import MULTICLASS_TASKS

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureSpec:
    """The model's input row: the user embeddings of its ``views`` (history: ``embedding``, state:
    ``state_embedding``), then the raw numeric features after log1p and (x - mean) / std."""

    names: list[str]
    mean: list[float]
    std: list[float]
    embedding_dim: int
    embed_model_id: str
    views: list[str] = field(default_factory=lambda: ["history"])  # train.views (older artifacts: history)
    state_dim: int = 0

    def transform(self, raw: np.ndarray) -> np.ndarray:
        x = np.log1p(np.maximum(raw.astype(np.float64), 0.0))
        return ((x - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def inputs(self, embedding: np.ndarray | None, state: np.ndarray | None, raw: np.ndarray) -> np.ndarray:
        """One input row per user: [embedding if history] [state if state] [standardized features]. A user
        without a state text (null ``state_embedding``, passed as NaN rows) reads zeros there."""
        parts = []
        if "history" in self.views:
            assert embedding is not None
            parts.append(embedding.astype(np.float32))
        if "state" in self.views:
            assert state is not None
            parts.append(np.nan_to_num(state.astype(np.float32), nan=0.0))
        parts.append(self.transform(raw))
        return np.concatenate(parts, axis=1)

    @property
    def input_dim(self) -> int:
        history = self.embedding_dim if "history" in self.views else 0
        return history + (self.state_dim if "state" in self.views else 0) + len(self.names)


def vectors_of(column: Any, n: int, dim: int) -> np.ndarray:
    """An Arrow list<float> column of ``n`` rows as an (n, dim) array; null rows become NaN rows."""
    if column.null_count == 0:
        return column.flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
    out = np.full((n, dim), np.nan, np.float32)
    valid = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
    if len(valid):
        out[valid] = column.drop_null().flatten().to_numpy(zero_copy_only=False).reshape(len(valid), -1)
    return out


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
    rec: dict[str, Any] | None = None  # {"n_items", "text_dim", **SequentialConfig}: the sequential recommendation head

    def head_sizes(self) -> dict[str, int]:
        return {t: (len(self.classes) if t in MULTICLASS_TASKS else 1) for t in self.tasks}


JOB_FORMAT = 1
METRICS_FORMAT = 1


@dataclass(frozen=True)
class DPJob:
    """DP-SGD of one training run (Opacus, user-level: one sample per user)."""

    target_epsilon: float
    target_delta: float
    max_grad_norm: float


@dataclass(frozen=True)
class RecJob:
    """The recommendation head's part of a training run."""

    k: int
    history: int
    weight: float = 1.0


@dataclass(frozen=True)
class TrainingData:
    """What a model was trained on: dates, split counts, the encoder of its input vectors."""

    as_of_date: str
    cutoff: str
    horizon_days: int
    splits: dict[str, dict[str, int]]
    embed_model_id: str


@dataclass(frozen=True)
class TrainJob:
    """Everything a training process needs (paths and settings; the data stays in the snapshot).

    Built by the train stage, pickled by TorchDistributor to every rank."""

    snapshot: str
    snapshot_id: str
    artifact: str
    version: str
    config: ModelConfig
    features: FeatureSpec
    data: TrainingData
    batch_size: int
    epochs: int
    patience: int
    learning_rate: float
    weight_decay: float
    seed: int
    use_gpu: bool = False
    dp: DPJob | None = None
    # test metrics of the baselines, stored beside the model's
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per binary task, the baseline's logistic regression on the standardized features ({"weight", "bias"}):
    # the head's other candidate (train.baseline_fallback); None: no fallback
    baseline_heads: dict[str, dict[str, list]] | None = None
    # per binary task, a regression on the state embedding and the numeric features (the model's wide inputs,
    # same layout): a third candidate of each head (train.state_probe); None: none
    probe_heads: dict[str, dict[str, list]] | None = None
    recommend: RecJob | None = None
    torch_threads: int | None = None  # None: the host's cores shared by its ranks
    log_every_epochs: int = 1  # rank 0 logs epoch 0, every this many epochs, and the last
    format_version: int = JOB_FORMAT


@dataclass(frozen=True)
class TrainingInfo:
    """How a training run went (metrics.json ``training``; the train stage's details)."""

    best_epoch: int
    best_valid_loss: float
    epochs_run: int
    samples: int
    fit_seconds: float
    samples_per_second: float
    world_size: int
    device: str
    train_seconds: float = 0.0
    best_rec_epoch: int | None = None
    best_valid_rec_loss: float | None = None
    # per task: "baseline" (the head is the baseline's regression) or "trained"
    baseline_fallback: dict[str, str] = field(default_factory=dict)
    # DP-SGD: epsilon, delta, target_epsilon, max_grad_norm, noise_multiplier, accountant, sampling, unit
    dp: dict[str, Any] | None = None


@dataclass(frozen=True)
class TrainSummary:
    """What every rank returns to the driver: small, no weights, no per-user rows."""

    training: TrainingInfo
    test: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ModelMetrics:
    """``metrics.json`` of a model artifact."""

    version: str
    snapshot_id: str
    model: dict[str, dict[str, Any]]
    baseline: dict[str, dict[str, Any]]
    data: TrainingData
    training: TrainingInfo
    history: list[dict[str, float]] = field(default_factory=list)
    recommendations: dict[str, dict[str, Any]] | None = None
    # quality by activity decile and by published segment (userlens.models.quality), added after training
    by_group: dict[str, Any] | None = None
    format_version: int = METRICS_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "ModelMetrics":
        """Read a metrics.json (one written before the format version counts as version 1); a
        missing or misspelt key is a ValueError naming it."""
        found = raw.get("format_version", METRICS_FORMAT)
        if found != METRICS_FORMAT:
            raise ValueError(f"metrics format version {found} is not supported (this userlens reads {METRICS_FORMAT})")
        try:
            return cls(
                version=raw["version"],
                snapshot_id=raw["snapshot_id"],
                model=raw["model"],
                baseline=raw["baseline"],
                data=TrainingData(**raw["data"]),
                training=TrainingInfo(**raw["training"]),
                history=raw.get("history", []),
                recommendations=raw.get("recommendations"),
                by_group=raw.get("by_group"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"metrics.json: {exc}") from exc
