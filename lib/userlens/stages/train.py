"""Train: point-in-time training set -> TorchDistributor DDP -> versioned model artifact, beside a baseline.

Point in time. For an as-of date D and horizon H the cutoff is C = D - H.
Everything the model reads was knowable at the end of day C: numeric features
and the user's text (hence its embedding) use events with ``event_date <= C``;
labels use only the H days after it, ``C < event_date <= D``:

* ``purchase``: any purchase in (C, D];
* ``churn``: no event at all in (C, D];
* ``next_category``: category of the first purchase in (C, D], else of the
  first view (no label for churned users).

Users with at least one event up to C are in the set; they go to train / valid
/ test by a salted hash of user_key, so a user stays in its split from run to
run. The set is written once as a Parquet snapshot (``split=train|valid|test``
folders, at least ``num_processes`` files each) under
``<storage.models>/snapshots/<snapshot_id>``; the torch ranks stream their own
files of it and the baseline (Spark MLlib logistic regression on the numeric
features only) reads the same snapshot, so both see the same split.

Texts as of C are built by the textualize code with as_of = C and embedded by
the embed stage's embedder; a text whose hash is already in
``user_embeddings`` for the same model is not embedded again. They are not
written to ``user_texts`` / ``user_embeddings``, whose rows stay the latest.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from userlens.artifacts import ModelStore
from userlens.config import Settings, TrainSettings
from userlens.embedding import (
    Embedder,
    EncoderSpec,
    check_gpu_conf,
    is_empty_text,
    item_texts,
    spark_conf,
    user_vectors,
    vectors_for,
    with_user_vectors,
)
from userlens.errors import ConfigError, UserlensError
from userlens.eval.spark_baselines import (
    STATE_PROBE,
    TEXT_BASELINE,
    als_grid,
    bag_of_words_baseline,
    fit_baseline,
    fit_state_probe,
    recommendation_baselines,
    standardized_linear,
)
from userlens.features import (
    SPLITS,
    category_classes,
    check_counts,
    class_index,
    cutoff,
    feature_names,
    item_history,
    labelled_users,
    normalization,
    split_counts,
)
from userlens.models.contracts import DPJob, FeatureSpec, ModelConfig, RecJob, TrainingData, TrainJob, TrainSummary
from userlens.models.quality import quality_line
from userlens.models.sequential import SequentialConfig
from userlens.models.tasks import BINARY_TASKS, MULTICLASS_TASKS
from userlens.runs import RunRecord, StageRun
from userlens.segments import published_segments
from userlens.tables import Tables
from userlens.text.user_texts import build_user_texts

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class TrainResult:
    as_of_date: dt.date
    cutoff: dt.date
    version: str
    path: str
    users: dict[str, int]
    model: dict[str, dict[str, float]]
    baseline: dict[str, dict[str, float]]
    dp: dict[str, Any] | None
    seconds: dict[str, float]
    # train.baseline_fallback: per task, "trained" or "baseline" (the head is the baseline's regression)
    heads: dict[str, str] = field(default_factory=dict)
    snapshot_id: str = ""
    cutoff_texts_embedded: int = 0
    # how the fit went: samples_per_second, epochs_run, best_epoch, world_size
    fit: dict[str, Any] = field(default_factory=dict)

    def run_record(self) -> RunRecord:
        return RunRecord(
            sum(self.users.values()),
            self.users.get("train", 0),
            {
                "version": self.version,
                "cutoff": self.cutoff.isoformat(),
                "snapshot_id": self.snapshot_id,
                "artifact": self.path,
                "users": self.users,
                "model": self.model,
                "baseline": self.baseline,
                "dp": self.dp,
                **self.fit,
                "baseline_fallback": self.heads,
                "cutoff_texts_embedded": self.cutoff_texts_embedded,
                **self.seconds,
            },
        )


def check_train_settings(settings: Settings) -> None:
    """Fail before any Spark job on settings that cannot work (missing extras, GPU without GPUs)."""
    train = settings.train
    if train.dp.enabled:
        try:
            import opacus  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "train.dp.enabled: DP-SGD needs Opacus, which is not installed: pip install 'userlens[privacy]'"
            ) from exc
    if train.mlflow.enabled:
        try:
            import mlflow  # noqa: F401
        except ImportError as exc:
            raise ConfigError("train.mlflow.enabled: mlflow is not installed: pip install 'userlens[mlflow]'") from exc
    if train.use_gpu:
        import torch

        if train.local_mode and not torch.cuda.is_available():
            raise ConfigError(
                "train.use_gpu: no CUDA GPU is visible on the driver (train.local_mode=true runs the processes there)"
            )
    if "next_category" not in train.tasks and not any(t in BINARY_TASKS for t in train.tasks):
        raise ConfigError("train.tasks: no task to train")
    if train.dp.enabled and train.recommend.enabled:
        raise ConfigError(
            "train.recommend.enabled: the sequential head's softmax mixes users' items, so it "
            "cannot be trained with DP-SGD (train.dp.enabled); set train.recommend.enabled=false"
        )


def check_train_cluster(spark: "SparkSession", train: TrainSettings) -> None:
    """With ``use_gpu`` and ``local_mode=false`` the ranks run as a barrier stage that asks each task for
    a GPU: the executors and tasks must have GPU resources (one line naming the Spark key otherwise)."""
    if train.use_gpu and not train.local_mode:
        master, conf = spark_conf(spark)
        check_gpu_conf(conf, master, why="train.use_gpu is true with train.local_mode false")


def run_train(spark: "SparkSession", settings: Settings, run: StageRun, as_of: dt.date | None = None) -> TrainResult:
    """Build the point-in-time snapshot, fit the baseline, train with TorchDistributor, write the artifact."""
    check_train_settings(settings)
    check_train_cluster(spark, settings.train)
    train = settings.train
    model_id = EncoderSpec.from_settings(settings.embed).model_id
    embedder = Embedder(spark, settings)
    tables = Tables(spark, settings.storage)
    as_of = tables.as_of_date("events", "event_date", "ingest", as_of)
    events = tables.read("events")
    cut = cutoff(as_of, train.horizon_days)
    run.as_of_date = as_of
    version = run.run_id
    store = ModelStore.of(settings)
    snapshot_id = f"{cut.isoformat()}-{run.run_id}"
    snapshot = store.snapshot(snapshot_id)
    artifact = store.path(version)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    log.info(
        "train: cutoff %s (as of %s, horizon %d days); features and texts up to the cutoff, labels after it",
        cut,
        as_of,
        train.horizon_days,
    )

    frame = labelled_users(events, cut, as_of, settings.ingest.event_types, train)
    texts = build_user_texts(
        events.where(F.col("event_date") <= F.lit(cut)),
        tables.read("items"),
        settings.textualize,
        settings.ingest.event_types,
        cut,
    )
    state = "state" in train.views
    frame = frame.join(texts.select("user_key", "text", "text_hash", "state_text", "state_hash"), "user_key")
    rec = train.recommend if train.recommend.enabled else None
    if rec is not None:
        frame = _with_item_history(frame, item_history(events, cut, as_of, rec.history), rec.eval_users)
    frame = frame.persist(StorageLevel.MEMORY_AND_DISK)
    cutoff_vectors = None
    try:
        counts = split_counts(frame)
        classes = category_classes(frame, train.max_categories) if "next_category" in train.tasks else []
        check_counts(counts, train, classes)
        t0 = time.perf_counter()
        cutoff_vectors = user_vectors(embedder, frame, _stored(tables, "user_embeddings"), model_id, state)
        vectors, cutoff_texts_embedded = cutoff_vectors.frame, cutoff_vectors.embedded
        log.info(
            "train: %d texts as of the cutoff embedded (the rest reused from user_embeddings)", cutoff_texts_embedded
        )
        timings["cutoff_embed_seconds"] = time.perf_counter() - t0
        text_baseline: dict[str, dict[str, float]] = {}
        if train.text_baseline and any(t in BINARY_TASKS for t in train.tasks):
            t0 = time.perf_counter()
            words = frame.select(
                "split", "features", F.concat_ws("\n", "text", "state_text").alias("text"), *BINARY_TASKS
            )
            found = bag_of_words_baseline(words, train.tasks, train.linear_reg_params)
            text_baseline = {f"{task} {TEXT_BASELINE}": m for task, m in found.items()}
            timings["text_baseline_seconds"] = time.perf_counter() - t0
        snap = with_user_vectors(frame, vectors, state).select(
            "user_key",
            "split",
            "embedding",
            *(["state_embedding"] if state else []),
            "features",
            "purchase",
            "churn",
            class_index(F.col("next_category_name"), classes).alias("next_category"),
            *(REC_COLUMNS if rec is not None else ()),
        )
        n_users = sum(c["users"] for c in counts.values())
        files = max(train.num_processes, math.ceil(n_users / train.snapshot_rows_per_file))
        snap.repartition(files).write.mode("errorifexists").partitionBy("split").parquet(snapshot)
    finally:
        frame.unpersist()
        if cutoff_vectors is not None:
            cutoff_vectors.release()
    if rec is not None:
        n_items = _write_catalogue(spark, tables, embedder, settings, model_id, snapshot)
    timings["snapshot_seconds"] = time.perf_counter() - started
    log.info(
        "train: snapshot %s written (%s)",
        snapshot_id,
        ", ".join(f"{s} {counts.get(s, {}).get('users', 0)} users" for s in SPLITS),
    )

    names = feature_names(settings.ingest.event_types)
    stored = read_snapshot(spark, snapshot)
    mean, std = normalization(stored.where(F.col("split") == "train"), len(names))
    first = stored.select("embedding").first()
    assert first is not None  # check_counts above: the snapshot has users
    dim = len(first[0])
    features = FeatureSpec(names, mean, std, dim, model_id, list(train.views), dim if state else 0)
    rec_config = None
    if rec is not None:
        # the sequential head (userlens.models.sequential) over the catalogue's item-text embeddings
        rec_config = {"n_items": n_items, "text_dim": dim, **asdict(SequentialConfig.of(rec, train.seed))}
    config = ModelConfig(
        tasks=list(train.tasks),
        classes=classes,
        hidden=list(train.hidden),
        dropout=train.dropout,
        input_dim=features.input_dim,
        # the wide path: the numeric features, and the state embedding before them (a few facts: a linear read)
        numeric_dim=len(names) + (dim if state else 0),
        rec=rec_config,
    )

    t0 = time.perf_counter()
    linear: dict[str, dict[str, list]] = {}
    baseline = fit_baseline(
        stored, train.tasks, len(classes), predictions_to=f"{artifact}/baseline_predictions.npz", linear_out=linear
    )
    baseline.update(text_baseline)
    als_out: dict[str, Any] = {}
    if rec is not None:
        grid = als_grid(rec.als, settings.evaluate.als_reg_params, settings.evaluate.als_alphas)
        baseline.update(recommendation_baselines(stored, events, cut, rec, grid, als_out))
    timings["baseline_seconds"] = time.perf_counter() - t0
    log.info("train: baselines fitted in %.1fs", timings["baseline_seconds"])

    # not under DP-SGD: the baseline and the probe saw the training data without noise, so a head chosen from
    # them would spend privacy the accountant does not count
    fallback = train.baseline_fallback and not train.dp.enabled
    probe: dict[str, dict[str, list]] = {}
    if fallback and state and train.state_probe and any(t in BINARY_TASKS for t in train.tasks):
        t0 = time.perf_counter()
        probe, probe_tested = fit_state_probe(stored, train.tasks, train.linear_reg_params, linear)
        baseline.update({f"{task} {STATE_PROBE}": m for task, m in probe_tested.items()})
        timings["state_probe_seconds"] = time.perf_counter() - t0
    n_train = counts["train"]["users"]
    dp = None
    if train.dp.enabled:
        delta = train.dp.target_delta or 10.0 ** -math.ceil(math.log10(max(n_train, 2)))
        dp = DPJob(train.dp.target_epsilon, delta, train.dp.max_grad_norm)
    job = TrainJob(
        snapshot=snapshot,
        snapshot_id=snapshot_id,
        artifact=artifact,
        version=version,
        config=config,
        features=features,
        use_gpu=train.use_gpu,
        batch_size=train.batch_size,
        epochs=train.epochs,
        patience=train.patience,
        log_every_epochs=train.log_every_epochs,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        seed=train.seed,
        dp=dp,
        baseline=baseline,
        baseline_heads=standardized_linear(linear, features) if fallback else None,
        probe_heads=standardized_linear(probe, features) if probe else None,
        recommend=RecJob(rec.k, rec.history, rec.weight) if rec is not None else None,
        data=TrainingData(as_of.isoformat(), cut.isoformat(), train.horizon_days, counts, model_id),
    )
    t0 = time.perf_counter()
    summary = distributed_fit(job, train)
    timings["distributor_seconds"] = time.perf_counter() - t0
    timings["fit_seconds"] = summary.training.fit_seconds
    if rec is not None and als_out.get("items"):
        # the recommender that ships: the head fused with the tuned ALS, its weight chosen on validation
        from userlens.models.training import add_fusion

        t0 = time.perf_counter()
        summary.test["recommend"] = add_fusion(
            artifact, snapshot, als_out["items"], als_out["setting"], rec.k, rec.eval_users
        )
        timings["fusion_seconds"] = time.perf_counter() - t0

    from userlens.models.training import write_quality_by_group

    t0 = time.perf_counter()
    by_group = write_quality_by_group(
        artifact,
        snapshot,
        train.recommend.k,
        settings.privacy.min_segment_size,
        published_segments(tables, settings, model_id),
    )
    timings["quality_by_group_seconds"] = time.perf_counter() - t0
    log.info("train: quality by group: %s", quality_line(by_group))

    if settings.gate.enabled and store.latest() is not None:
        store.propose(version)  # published by the quality gate (userlens.stages.gate) when the night passes
        log.info("train: model %s is the candidate; the quality gate publishes it", version)
    else:
        store.publish(version)
    timings["total_seconds"] = time.perf_counter() - started
    if train.mlflow.enabled:
        _log_mlflow(settings, job, summary, baseline, artifact)

    info = summary.training
    result = TrainResult(
        as_of,
        cut,
        version,
        artifact,
        {s: c["users"] for s, c in counts.items()},
        summary.test,
        baseline,
        info.dp,
        timings,
        info.baseline_fallback,
        snapshot_id,
        cutoff_texts_embedded,
        {
            "samples_per_second": info.samples_per_second,
            "epochs_run": info.epochs_run,
            "best_epoch": info.best_epoch,
            "world_size": info.world_size,
        },
    )
    for task in train.tasks:
        key = "accuracy" if task in MULTICLASS_TASKS else "auc"
        log.info(
            "train: %s test %s %.4f (baseline %.4f)",
            task,
            key,
            summary.test[task][key],
            baseline.get(task, {}).get(key, float("nan")),
        )
    if rec is not None:
        key = f"recall@{rec.k}"
        log.info(
            "train: recommendations test %s: userlens (sequential head + %g x ALS) %.4f, popularity %.4f, "
            "ALS %.4f (regParam %g, alpha %g) (%d users)",
            key,
            summary.test["recommend"].get("als_weight", 0.0),
            summary.test["recommend"].get(key, float("nan")),
            baseline["recommend_popularity"].get(key, float("nan")),
            baseline["recommend_als"].get(key, float("nan")),
            baseline["recommend_als"].get("reg_param", float("nan")),
            baseline["recommend_als"].get("alpha", float("nan")),
            summary.test["recommend"].get("users", 0),
        )
    return result


def read_snapshot(spark: "SparkSession", snapshot: str) -> DataFrame:
    """The snapshot's user rows (``split=*`` folders; ``items/`` beside them is the item catalogue)."""
    return spark.read.option("basePath", snapshot).parquet(f"{snapshot}/split=*")


def distributed_fit(job: TrainJob, train: TrainSettings) -> TrainSummary:
    """Run :func:`userlens.models.training.train_main` under TorchDistributor; rank 0's summary."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from userlens.models.training import train_main

    log.info(
        "train: TorchDistributor(num_processes=%d, local_mode=%s, use_gpu=%s)",
        train.num_processes,
        train.local_mode,
        train.use_gpu,
    )
    distributor = TorchDistributor(
        num_processes=train.num_processes, local_mode=train.local_mode, use_gpu=train.use_gpu
    )
    # torchrun sets OMP_NUM_THREADS=1 in each local rank when it is unset, with a six-line banner on stdout;
    # the ranks set their own thread counts (TrainJob.torch_threads), so say 1 and skip the banner. Only
    # while the ranks start: the Python workers Spark forks later keep the driver's environment.
    with _environ(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")):
        summary = distributor.run(train_main, job)
    if not isinstance(summary, TrainSummary):
        raise UserlensError("train: the training processes returned no summary (see their log above)")
    return summary


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """These environment variables inside, the previous values (or none) after."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in previous.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


REC_COLUMNS = ("hist_items", "hist_ages", "bought", "next_items", "rec_eval")


def _with_item_history(frame: DataFrame, history: DataFrame, eval_users: int) -> DataFrame:
    """Add the REC_COLUMNS; ``rec_eval`` marks the test users the recommenders are evaluated on: those
    with a next purchase, a hash sample of about ``eval_users`` of them when there are more."""
    empty = F.array().cast("array<string>")
    joined = frame.join(history, "user_key", "left").select(
        *frame.columns,
        *[
            F.coalesce(c, empty if c != "hist_ages" else F.array().cast("array<int>")).alias(c)
            for c in ("hist_items", "hist_ages", "bought", "next_items")
        ],
    )
    candidates = (F.col("split") == "test") & (F.size("next_items") > 0)
    n = joined.where(candidates).count()
    share = min(1.0, eval_users / n) if n else 1.0
    sampled = F.pmod(F.xxhash64(F.lit("rec-eval"), "user_key"), F.lit(1_000_000)) < F.lit(int(share * 1_000_000))
    return joined.withColumn("rec_eval", candidates & (sampled if share < 1.0 else F.lit(True)))


def _write_catalogue(
    spark: "SparkSession", tables: Tables, embedder: Any, settings: Settings, model_id: str, snapshot: str
) -> int:
    """``<snapshot>/items``: item_id, embedding and log q (the item's share of the train split's next
    purchases, +1 smoothed) of every catalogue item with a text; the item embeddings in
    ``item_embeddings`` are reused, the rest embedded now."""
    if not tables.exists("items"):
        raise UserlensError(
            "train.recommend.enabled: no items table: run `userlens ingest` with an item catalog, "
            "or set train.recommend.enabled=false"
        )
    texts = item_texts(tables.read("items"), settings.embed.item_text_fields).where(~is_empty_text("text"))
    vectors = vectors_for(embedder, texts, _stored(tables, "item_embeddings"), model_id)
    positives = (
        read_snapshot(spark, snapshot)
        .where(F.col("split") == "train")
        .select(F.explode("next_items").alias("item_id"))
        .groupBy("item_id")
        .count()
    )
    items = (
        texts.join(vectors.frame, "text_hash")
        .select("item_id", "embedding")
        .dropDuplicates(["item_id"])
        .join(positives, "item_id", "left")
        .withColumn("count", F.coalesce("count", F.lit(0)) + 1)
    )
    total = F.sum("count").over(Window.partitionBy())
    items = items.select("item_id", "embedding", F.log(F.col("count") / total).alias("log_q"))
    items = items.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n = items.count()
        if n < 2:
            raise UserlensError(
                f"train.recommend.enabled: the item catalog has {n} item(s) with a text; "
                "need at least 2 (or set train.recommend.enabled=false)"
            )
        items.coalesce(max(1, math.ceil(n / 200_000))).write.mode("errorifexists").parquet(f"{snapshot}/items")
    finally:
        items.unpersist()
        vectors.release()
    return n


def _stored(tables: Tables, table: str) -> DataFrame | None:
    return tables.read(table) if tables.exists(table) else None


def _log_mlflow(
    settings: Settings, job: TrainJob, summary: TrainSummary, baseline: dict[str, dict[str, float]], artifact: str
) -> None:
    import mlflow

    cfg = settings.train.mlflow
    if cfg.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name=job.version):
        mlflow.log_params(
            {
                k: getattr(job, k)
                for k in ("batch_size", "epochs", "patience", "learning_rate", "weight_decay", "seed", "snapshot_id")
            }
        )
        for prefix, metrics in (("model", summary.test), ("baseline", baseline)):
            for task, values in metrics.items():
                mlflow.log_metrics(
                    {f"{prefix}.{task}.{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))}
                )
        if "://" not in artifact:
            mlflow.log_artifacts(artifact, artifact_path="model")
