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
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from userlens.config import Settings, TrainSettings
from userlens.errors import ConfigError, UserlensError, require_columns
from userlens.models.predictor import BINARY_TASKS, MULTICLASS_TASKS, FeatureSpec, ModelConfig
from userlens.runs import StageRun
from userlens.stages.textualize import build_user_texts
from userlens.tables import Tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

WINDOWS = (7, 30, 90)
OTHER = "other"
LATEST = "LATEST"
SPLITS = ("train", "valid", "test")


def cutoff(as_of: dt.date, horizon_days: int) -> dt.date:
    return as_of - dt.timedelta(days=horizon_days)


def feature_names(event_types: list[str]) -> list[str]:
    names = ["recency_days", "tenure_days", "n_events", "active_days"]
    names += [f"active_days_{w}d" for w in WINDOWS] + [f"spend_{w}d" for w in WINDOWS]
    names += [f"n_{t}_{w}d" for t in event_types for w in WINDOWS]
    return names


def numeric_features(events: DataFrame, cut: dt.date, event_types: list[str]) -> DataFrame:
    """(user_key, features array<double>) from events up to ``cut`` only (RFM and counts by window)."""
    require_columns(events, ("user_key", "event_date", "event_type", "price", "quantity"), "train features")
    c = F.lit(cut)
    known = events.where(F.col("event_date") <= c)

    def recent(w: int) -> Column:
        return F.col("event_date") > F.date_sub(c, w)

    spend = F.when(F.col("event_type") == "purchase",
                   F.coalesce(F.col("price"), F.lit(0.0)) * F.coalesce(F.col("quantity"), F.lit(1)))
    aggs = [
        F.datediff(c, F.max("event_date")), F.datediff(c, F.min("event_date")), F.count(F.lit(1)),
        F.count_distinct("event_date"),
        *[F.count_distinct(F.when(recent(w), F.col("event_date"))) for w in WINDOWS],
        *[F.sum(F.when(recent(w), spend)) for w in WINDOWS],
        *[F.sum(F.when(recent(w) & (F.col("event_type") == t), 1)) for t in event_types for w in WINDOWS],
    ]
    agg = known.groupBy("user_key").agg(*[a.alias(f"f{i}") for i, a in enumerate(aggs)])
    return agg.select("user_key", F.array(*[F.coalesce(F.col(f"f{i}").cast("double"), F.lit(0.0))
                                            for i in range(len(aggs))]).alias("features"))


def labels(events: DataFrame, cut: dt.date, as_of: dt.date) -> DataFrame:
    """(user_key, purchase, next_category_name) for users active in (cut, as_of]; absent users churned."""
    window = events.where((F.col("event_date") > F.lit(cut)) & (F.col("event_date") <= F.lit(as_of)))

    def first_category(event_type: str) -> Column:
        hit = (F.col("event_type") == event_type) & F.col("category").isNotNull()
        return F.min(F.when(hit, F.struct("event_time", "event_id", "category")))["category"]

    return window.groupBy("user_key").agg(
        F.max((F.col("event_type") == "purchase").cast("int")).alias("purchase"),
        F.coalesce(first_category("purchase"), first_category("view")).alias("next_category_name"))


def item_history(events: DataFrame, cut: dt.date, as_of: dt.date, history: int) -> DataFrame:
    """The recommendation head's inputs and labels, one row per user with an item event:

    * ``hist_items`` / ``hist_ages``: the newest ``history`` distinct items of any event up to ``cut``,
      newest first, and the days between their last event and ``cut``;
    * ``bought``: items purchased up to ``cut`` (never recommended again);
    * ``next_items``: items purchased in (cut, as_of] that were not bought before (the positives).
    """
    c = F.lit(cut)
    with_item = events.where(F.col("item_id").isNotNull())
    purchase = (F.col("event_type") == "purchase").cast("int")
    past = (with_item.where(F.col("event_date") <= c).groupBy("user_key", "item_id")
            .agg(F.max("event_time").alias("last"), F.max("event_date").alias("last_date"),
                 F.max(purchase).alias("was_bought")))
    newest = F.slice(F.sort_array(F.collect_list(F.struct("last", "item_id", "last_date")), asc=False), 1, history)
    hist = past.groupBy("user_key").agg(
        newest.alias("_h"),
        F.array_sort(F.collect_list(F.when(F.col("was_bought") == 1, F.col("item_id")))).alias("bought"))
    hist = hist.select("user_key", F.transform("_h", lambda x: x["item_id"]).alias("hist_items"),
                       F.transform("_h", lambda x: F.datediff(c, x["last_date"])).alias("hist_ages"), "bought")
    future = (with_item.where((F.col("event_date") > c) & (F.col("event_date") <= F.lit(as_of))
                              & (F.col("event_type") == "purchase"))
              .groupBy("user_key").agg(F.array_sort(F.collect_set("item_id")).alias("_next")))
    empty = F.array().cast("array<string>")
    joined = hist.join(future, "user_key", "full")
    return joined.select(
        "user_key", F.coalesce("hist_items", empty).alias("hist_items"),
        F.coalesce("hist_ages", F.array().cast("array<int>")).alias("hist_ages"),
        F.coalesce("bought", empty).alias("bought"),
        F.array_except(F.coalesce("_next", empty), F.coalesce("bought", empty)).alias("next_items"))


def split_of(user_key: Column, split: Any) -> Column:
    """'train' | 'valid' | 'test' from a salted 64-bit hash of user_key (stable across runs)."""
    u = F.pmod(F.xxhash64(F.lit(split.salt), user_key), F.lit(1_000_000)) / F.lit(1_000_000.0)
    return F.when(u < split.train, "train").when(u < split.train + split.valid, "valid").otherwise("test")


def labelled_users(events: DataFrame, cut: dt.date, as_of: dt.date, event_types: list[str],
                   train: TrainSettings) -> DataFrame:
    """user_key, split, features, purchase, churn, next_category_name: one row per user known at ``cut``."""
    feats = numeric_features(events, cut, event_types)
    future = labels(events, cut, as_of)
    joined = feats.join(future, "user_key", "left")
    return joined.select(
        "user_key", split_of(F.col("user_key"), train.split).alias("split"), "features",
        F.coalesce("purchase", F.lit(0)).alias("purchase"),
        F.when(F.col("purchase").isNull(), 1).otherwise(0).alias("churn"),
        "next_category_name")


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


def models_root(settings: Settings) -> str:
    root = settings.storage.models
    return root.rstrip("/") if "://" in root else os.path.abspath(root)


def latest_version(settings: Settings) -> str | None:
    """The version named in ``<storage.models>/LATEST`` (written after a complete artifact), or None."""
    from userlens.models.predictor import exists, read_bytes

    pointer = f"{models_root(settings)}/{LATEST}"
    return read_bytes(pointer).decode().strip() if exists(pointer) else None


def check_train_settings(settings: Settings) -> None:
    """Fail before any Spark job on settings that cannot work (missing extras, GPU without GPUs)."""
    train = settings.train
    if train.dp.enabled:
        try:
            import opacus  # noqa: F401
        except ImportError:
            raise ConfigError("train.dp.enabled: DP-SGD needs Opacus, which is not installed: "
                              "pip install 'userlens[privacy]'") from None
    if train.mlflow.enabled:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("train.mlflow.enabled: mlflow is not installed: pip install 'userlens[mlflow]'") \
                from None
    if train.use_gpu:
        import torch

        if train.local_mode and not torch.cuda.is_available():
            raise ConfigError("train.use_gpu: no CUDA GPU is visible on the driver (train.local_mode=true runs "
                              "the processes there)")
    if "next_category" not in train.tasks and not any(t in BINARY_TASKS for t in train.tasks):
        raise ConfigError("train.tasks: no task to train")
    if train.dp.enabled and train.recommend.enabled:
        raise ConfigError("train.recommend.enabled: the two-tower head's in-batch negatives mix users, so it "
                          "cannot be trained with DP-SGD (train.dp.enabled); set train.recommend.enabled=false")


def check_train_cluster(spark: "SparkSession", train: TrainSettings) -> None:
    """With ``use_gpu`` and ``local_mode=false`` the ranks run as a barrier stage that asks each task for
    a GPU: the executors and tasks must have GPU resources (one line naming the Spark key otherwise)."""
    from userlens.stages.embed import check_gpu_conf, spark_conf

    if train.use_gpu and not train.local_mode:
        master, conf = spark_conf(spark)
        check_gpu_conf(conf, master, why="train.use_gpu is true with train.local_mode false")


def run_train(spark: "SparkSession", settings: Settings, run: StageRun, as_of: dt.date | None = None) -> TrainResult:
    """Build the point-in-time snapshot, fit the baseline, train with TorchDistributor, write the artifact."""
    from userlens.stages.embed import Embedder, EncoderSpec

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
    root = models_root(settings)
    snapshot_id = f"{cut.isoformat()}-{run.run_id}"
    snapshot = f"{root}/snapshots/{snapshot_id}"
    artifact = f"{root}/{version}"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    log.info("train: cutoff %s (as of %s, horizon %d days); features and texts up to the cutoff, labels after it",
             cut, as_of, train.horizon_days)

    frame = labelled_users(events, cut, as_of, settings.ingest.event_types, train)
    texts = build_user_texts(events.where(F.col("event_date") <= F.lit(cut)), tables.read("items"),
                             settings.textualize, settings.ingest.event_types, cut)
    frame = frame.join(texts.select("user_key", "text", "text_hash"), "user_key")
    rec = train.recommend if train.recommend.enabled else None
    if rec is not None:
        frame = _with_item_history(frame, item_history(events, cut, as_of, rec.history), rec.eval_users)
    frame = frame.persist(StorageLevel.MEMORY_AND_DISK)
    fresh = None
    try:
        counts = _split_counts(frame)
        classes = _category_classes(frame, train.max_categories) if "next_category" in train.tasks else []
        _check_counts(counts, train, classes)
        t0 = time.perf_counter()
        vectors, fresh, cutoff_texts_embedded = _embeddings(tables, embedder, frame, model_id)
        timings["cutoff_embed_seconds"] = time.perf_counter() - t0
        snap = frame.join(vectors, "text_hash").select(
            "user_key", "split", "embedding", "features", "purchase", "churn",
            _class_index(F.col("next_category_name"), classes).alias("next_category"),
            *(REC_COLUMNS if rec is not None else ()))
        n_users = sum(c["users"] for c in counts.values())
        files = max(train.num_processes, math.ceil(n_users / train.snapshot_rows_per_file))
        snap.repartition(files).write.mode("errorifexists").partitionBy("split").parquet(snapshot)
    finally:
        frame.unpersist()
        if fresh is not None:
            fresh.unpersist()
    if rec is not None:
        n_items = _write_catalogue(spark, tables, embedder, settings, model_id, snapshot)
    timings["snapshot_seconds"] = time.perf_counter() - started
    log.info("train: snapshot %s written (%s)", snapshot_id,
             ", ".join(f"{s} {counts.get(s, {}).get('users', 0)} users" for s in SPLITS))

    names = feature_names(settings.ingest.event_types)
    stored = read_snapshot(spark, snapshot)
    mean, std = _normalization(stored.where(F.col("split") == "train"), len(names))
    dim = len(stored.select("embedding").first()[0])
    features = FeatureSpec(names, mean, std, dim, model_id)
    rec_config = None
    if rec is not None:
        from userlens.models.recommend import RecConfig

        rec_config = asdict(RecConfig(n_items, dim, dim + len(names), rec.dim, rec.hidden, rec.history,
                                      rec.history_half_life_days))
    config = ModelConfig(tasks=list(train.tasks), classes=classes, hidden=list(train.hidden), dropout=train.dropout,
                         input_dim=dim + len(names), numeric_dim=len(names), rec=rec_config)

    t0 = time.perf_counter()
    linear: dict[str, dict[str, list]] = {}
    baseline = fit_baseline(stored, train.tasks, len(classes), predictions_to=f"{artifact}/baseline_predictions.npz",
                            linear_out=linear)
    if rec is not None:
        baseline.update(recommendation_baselines(stored, events, cut, rec))
    timings["baseline_seconds"] = time.perf_counter() - t0

    n_train = counts["train"]["users"]
    dp = None
    if train.dp.enabled:
        delta = train.dp.target_delta or 10.0 ** -math.ceil(math.log10(max(n_train, 2)))
        dp = {"target_epsilon": train.dp.target_epsilon, "target_delta": delta,
              "max_grad_norm": train.dp.max_grad_norm}
    job = {
        "snapshot": snapshot, "snapshot_id": snapshot_id, "artifact": artifact, "version": version,
        "config": asdict(config), "features": asdict(features), "use_gpu": train.use_gpu,
        "batch_size": train.batch_size, "epochs": train.epochs, "patience": train.patience,
        "learning_rate": train.learning_rate, "weight_decay": train.weight_decay, "seed": train.seed,
        "dp": dp, "baseline": baseline,
        # not under DP-SGD: the baseline saw the training data without noise, so a head chosen from it
        # would spend privacy the accountant does not count
        "baseline_heads": standardized_linear(linear, features) if train.baseline_fallback and dp is None else None,
        "recommend": {"k": rec.k, "history": rec.history, "history_half_life_days": rec.history_half_life_days,
                      "weight": rec.weight} if rec is not None else {},
        "data": {"as_of_date": as_of.isoformat(), "cutoff": cut.isoformat(), "horizon_days": train.horizon_days,
                 "splits": counts, "embed_model_id": model_id},
    }
    t0 = time.perf_counter()
    summary = distributed_fit(job, train)
    timings["distributor_seconds"] = time.perf_counter() - t0
    timings["fit_seconds"] = summary["fit_seconds"]

    from userlens.models.predictor import write_bytes

    write_bytes(f"{root}/{LATEST}", (version + "\n").encode())
    timings["total_seconds"] = time.perf_counter() - started
    if train.mlflow.enabled:
        _log_mlflow(settings, job, summary, baseline, artifact)

    result = TrainResult(as_of, cut, version, artifact, {s: c["users"] for s, c in counts.items()},
                         summary["test"], baseline, summary.get("dp"), timings, summary.get("baseline_fallback", {}))
    run.rows_in, run.rows_out = n_users, n_train
    run.details.update({
        "version": version, "cutoff": cut.isoformat(), "snapshot_id": snapshot_id, "artifact": artifact,
        "users": result.users, "model": summary["test"], "baseline": baseline, "dp": summary.get("dp"),
        "samples_per_second": summary["samples_per_second"], "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"], "world_size": summary["world_size"],
        "baseline_fallback": summary.get("baseline_fallback", {}), "cutoff_texts_embedded": cutoff_texts_embedded,
        **timings,
    })
    for task in train.tasks:
        key = "accuracy" if task in MULTICLASS_TASKS else "auc"
        log.info("train: %s test %s %.4f (baseline %.4f)", task, key, summary["test"][task][key],
                 baseline.get(task, {}).get(key, float("nan")))
    if rec is not None:
        key = f"recall@{rec.k}"
        log.info("train: recommendations test %s: two-tower %.4f, popularity %.4f, ALS %.4f (%d users)", key,
                 summary["test"]["recommend"].get(key, float("nan")),
                 baseline["recommend_popularity"].get(key, float("nan")),
                 baseline["recommend_als"].get(key, float("nan")), summary["test"]["recommend"].get("users", 0))
    return result


def read_snapshot(spark: "SparkSession", snapshot: str) -> DataFrame:
    """The snapshot's user rows (``split=*`` folders; ``items/`` beside them is the item catalogue)."""
    return spark.read.option("basePath", snapshot).parquet(f"{snapshot}/split=*")


def distributed_fit(job: dict[str, Any], train: TrainSettings) -> dict[str, Any]:
    """Run :func:`userlens.models.training.train_main` under TorchDistributor; rank 0's summary."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from userlens.models.training import train_main

    log.info("train: TorchDistributor(num_processes=%d, local_mode=%s, use_gpu=%s)", train.num_processes,
             train.local_mode, train.use_gpu)
    summary = TorchDistributor(num_processes=train.num_processes, local_mode=train.local_mode,
                               use_gpu=train.use_gpu).run(train_main, job)
    if not isinstance(summary, dict):
        raise UserlensError("train: the training processes returned no summary (see their log above)")
    return summary


REC_COLUMNS = ("hist_items", "hist_ages", "bought", "next_items", "rec_eval")


def _with_item_history(frame: DataFrame, history: DataFrame, eval_users: int) -> DataFrame:
    """Add the REC_COLUMNS; ``rec_eval`` marks the test users the recommenders are evaluated on: those
    with a next purchase, a hash sample of about ``eval_users`` of them when there are more."""
    empty = F.array().cast("array<string>")
    joined = frame.join(history, "user_key", "left").select(
        *frame.columns, *[F.coalesce(c, empty if c != "hist_ages" else F.array().cast("array<int>")).alias(c)
                          for c in ("hist_items", "hist_ages", "bought", "next_items")])
    candidates = (F.col("split") == "test") & (F.size("next_items") > 0)
    n = joined.where(candidates).count()
    share = min(1.0, eval_users / n) if n else 1.0
    sampled = F.pmod(F.xxhash64(F.lit("rec-eval"), "user_key"), F.lit(1_000_000)) < F.lit(int(share * 1_000_000))
    return joined.withColumn("rec_eval", candidates & (sampled if share < 1.0 else F.lit(True)))


def _write_catalogue(spark: "SparkSession", tables: Tables, embedder: Any, settings: Settings, model_id: str,
                     snapshot: str) -> int:
    """``<snapshot>/items``: item_id, embedding and log q (the item's share of the train split's next
    purchases, +1 smoothed) of every catalogue item with a text; the item embeddings in
    ``item_embeddings`` are reused, the rest embedded now."""
    from userlens.stages.embed import is_empty_text, item_texts

    if not tables.exists("items"):
        raise UserlensError("train.recommend.enabled: no items table: run `userlens ingest` with an item catalog, "
                            "or set train.recommend.enabled=false")
    texts = item_texts(tables.read("items"), settings.embed.item_text_fields).where(~is_empty_text("text"))
    vectors, fresh, _ = _embeddings(tables, embedder, texts, model_id, table="item_embeddings")
    positives = (read_snapshot(spark, snapshot).where(F.col("split") == "train")
                 .select(F.explode("next_items").alias("item_id")).groupBy("item_id").count())
    items = (texts.join(vectors, "text_hash").select("item_id", "embedding").dropDuplicates(["item_id"])
             .join(positives, "item_id", "left").withColumn("count", F.coalesce("count", F.lit(0)) + 1))
    total = F.sum("count").over(Window.partitionBy())
    items = items.select("item_id", "embedding", F.log(F.col("count") / total).alias("log_q"))
    items = items.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n = items.count()
        if n < 2:
            raise UserlensError(f"train.recommend.enabled: the item catalog has {n} item(s) with a text; "
                                "need at least 2 (or set train.recommend.enabled=false)")
        items.coalesce(max(1, math.ceil(n / 200_000))).write.mode("errorifexists").parquet(f"{snapshot}/items")
    finally:
        items.unpersist()
        if fresh is not None:
            fresh.unpersist()
    return n


def recommendation_baselines(snapshot: DataFrame, events: DataFrame, cut: dt.date,
                             rec: Any) -> dict[str, dict[str, float]]:
    """Popularity and Spark MLlib ALS (implicit) on everything known at ``cut``, evaluated like the
    two-tower head: the ``rec_eval`` test users, earlier purchases excluded, next purchases relevant."""
    from pyspark.ml.feature import StringIndexer
    from pyspark.ml.recommendation import ALS

    from userlens.models.training import ranking_summary

    k = rec.k
    users = snapshot.where("rec_eval").select("user_key", "bought", "next_items").collect()
    if not users:
        return {"recommend_popularity": {"users": 0}, "recommend_als": {"users": 0}}
    relevant = [set(u["next_items"]) for u in users]
    bought = [set(u["bought"]) for u in users]
    known = events.where((F.col("event_date") <= F.lit(cut)) & F.col("item_id").isNotNull())

    depth = k + max(len(b) for b in bought)
    popular = [r["item_id"] for r in known.where(F.col("event_type") == "purchase").groupBy("item_id").count()
               .orderBy(F.desc("count"), "item_id").limit(depth).collect()]
    pop_ranked = [[i for i in popular if i not in b][:k] for b in bought]

    # implicit feedback: a purchase counts 4, a cart 2, anything else with an item 1
    weight = (F.when(F.col("event_type") == "purchase", 4.0).when(F.col("event_type") == "cart", 2.0)
              .otherwise(1.0))
    ratings = known.groupBy("user_key", "item_id").agg(F.sum(weight).alias("rating"))
    user_ix = StringIndexer(inputCol="user_key", outputCol="u").fit(ratings)
    item_ix = StringIndexer(inputCol="item_id", outputCol="i").fit(ratings)
    data = item_ix.transform(user_ix.transform(ratings)).select(
        F.col("u").cast("int").alias("u"), F.col("i").cast("int").alias("i"), "rating")
    # ALS's default of 10 user and 10 item blocks: fewer where there are fewer cores (each block pair is a
    # task in every iteration's joins; on two local cores 10 blocks made ~1,100 tasks of a few ms each)
    blocks = max(1, min(10, snapshot.sparkSession.sparkContext.defaultParallelism))
    als = ALS(userCol="u", itemCol="i", ratingCol="rating", implicitPrefs=True, rank=rec.als.rank,
              maxIter=rec.als.max_iter, regParam=rec.als.reg_param, alpha=rec.als.alpha, seed=13,
              numUserBlocks=blocks, numItemBlocks=blocks, coldStartStrategy="drop").fit(data)
    wanted = user_ix.transform(snapshot.where("rec_eval").select("user_key")).select(
        F.col("u").cast("int").alias("u"), "user_key")
    recs = als.recommendForUserSubset(wanted, depth)
    labels = item_ix.labels
    by_user = {r["user_key"]: [labels[x["i"]] for x in r["recommendations"]]
               for r in recs.join(wanted, "u").select("user_key", "recommendations").collect()}
    als_ranked = [[i for i in by_user.get(u["user_key"], []) if i not in b][:k] for u, b in zip(users, bought)]
    return {"recommend_popularity": ranking_summary(pop_ranked, relevant, k),
            "recommend_als": ranking_summary(als_ranked, relevant, k)}


def _split_counts(frame: DataFrame) -> dict[str, dict[str, int]]:
    rows = frame.groupBy("split").agg(
        F.count(F.lit(1)).alias("users"), F.sum("purchase").alias("purchase"), F.sum("churn").alias("churn"),
        F.count("next_category_name").alias("next_category")).collect()
    return {r["split"]: {"users": r["users"], "purchase": int(r["purchase"] or 0), "churn": int(r["churn"] or 0),
                         "next_category": r["next_category"]} for r in rows}


def _check_counts(counts: dict[str, dict[str, int]], train: TrainSettings, classes: list[str]) -> None:
    """Clear errors before any training: too few users, a single-class label, an empty split."""
    for split in SPLITS:
        if counts.get(split, {}).get("users", 0) == 0:
            raise UserlensError(f"train: the {split} split is empty ({_describe(counts)}); more users are needed")
    n = counts["train"]["users"]
    if n < train.min_users:
        raise UserlensError(f"train: only {n} labelled users in the train split, below train.min_users="
                            f"{train.min_users} ({_describe(counts)})")
    for task in train.tasks:
        if task in BINARY_TASKS:
            for split, need in (("train", train.min_class_users), ("test", 1)):
                pos = counts[split][task]
                neg = counts[split]["users"] - pos
                if min(pos, neg) < need:
                    raise UserlensError(
                        f"train: task {task} has {pos} positive and {neg} negative users in the {split} split; "
                        f"need at least {need} of each (train.min_class_users)")
        elif len(classes) < 2:
            raise UserlensError(f"train: task next_category has {len(classes)} class(es) in the train split "
                                f"({counts['train']['next_category']} labelled users); need at least 2")


def _describe(counts: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{s} {counts.get(s, {}).get('users', 0)}" for s in SPLITS)


def _category_classes(frame: DataFrame, max_categories: int) -> list[str]:
    """The most frequent next_category labels of the train split; the rest become 'other'."""
    rows = (frame.where((F.col("split") == "train") & F.col("next_category_name").isNotNull())
            .groupBy("next_category_name").count().orderBy(F.desc("count"), "next_category_name").collect())
    names = [r[0] for r in rows]
    if len(names) <= max_categories:
        return names
    return names[:max_categories - 1] + [OTHER]


def _class_index(name: Column, classes: list[str]) -> Column:
    if not classes:
        return F.lit(-1)
    mapping = F.create_map(*[x for i, c in enumerate(classes) if c != OTHER for x in (F.lit(c), F.lit(i))])
    fallback = F.lit(classes.index(OTHER)) if OTHER in classes else F.lit(-1)
    return F.when(name.isNull(), -1).otherwise(F.coalesce(F.element_at(mapping, name), fallback))


def _embeddings(tables: Tables, embedder: Any, frame: DataFrame, model_id: str,
                table: str = "user_embeddings") -> tuple[DataFrame, DataFrame | None, int]:
    """(text_hash, embedding) for every text of ``frame``: those in ``table`` reused, the rest embedded now.

    Also returns the newly embedded vectors, persisted and counted (the encoder has run when this
    returns, so the caller can time it), for the caller to unpersist (None when every text was
    reused), and their number."""
    from userlens.stages.embed import distinct_texts

    wanted = frame.select("text_hash", "text").dropDuplicates(["text_hash"])
    if tables.exists(table):
        stored = (tables.read(table).where(F.col("model_id") == model_id)
                  .select("text_hash", "embedding").dropDuplicates(["text_hash"])
                  .join(wanted.select("text_hash"), "text_hash"))
    else:
        stored = None
    missing = wanted if stored is None else wanted.join(stored.select("text_hash"), "text_hash", "left_anti")
    n_missing = missing.count()
    log.info("train: embedding %d texts (the rest are reused from %s)", n_missing, table)
    if n_missing == 0:
        return stored, None, 0
    fresh = embedder(distinct_texts(missing, embedder.partitions(n_missing))).persist(StorageLevel.MEMORY_AND_DISK)
    fresh.count()  # runs the model once; the snapshot reads the cached vectors
    return (fresh if stored is None else fresh.unionByName(stored)), fresh, n_missing


def _normalization(train_rows: DataFrame, n: int) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of log1p(feature) over the train split (std 0 -> 1)."""
    x = [F.log1p(F.greatest(F.col("features")[i], F.lit(0.0))) for i in range(n)]
    row = train_rows.agg(*[F.avg(v) for v in x], *[F.stddev_pop(v) for v in x]).first()
    mean = [float(row[i] or 0.0) for i in range(n)]
    std = [float(row[n + i] or 0.0) or 1.0 for i in range(n)]
    return mean, std


def fit_baseline(snapshot: DataFrame, tasks: list[str], n_classes: int, predictions_to: str | None = None,
                 linear_out: dict[str, dict[str, list]] | None = None) -> dict[str, dict[str, float]]:
    """Spark MLlib logistic regression on log1p(numeric features) only: train split -> test metrics
    (and, with ``predictions_to``, the test labels and probabilities as .npz, no user keys). With
    ``linear_out``, each binary task's fitted model is put there as ``{"weight": [[w...]], "bias": [b]}``
    on the log1p scale (see :func:`standardized_linear`)."""
    import numpy as np
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.functions import array_to_vector, vector_to_array

    from userlens.models import metrics as M

    x = array_to_vector(F.transform("features", lambda v: F.log1p(F.greatest(v, F.lit(0.0))))).alias("x")
    data = snapshot.select("split", x, *tasks)
    train_rows, test_rows = data.where(F.col("split") == "train"), data.where(F.col("split") == "test")
    out: dict[str, dict[str, float]] = {}
    labels_out: dict[str, Any] = {}
    probs_out: dict[str, Any] = {}
    for task in tasks:
        multiclass = task in MULTICLASS_TASKS
        fit_rows = train_rows.where(F.col(task) >= 0) if multiclass else train_rows
        lr = LogisticRegression(featuresCol="x", labelCol=task, maxIter=50, regParam=1e-3,
                                family="multinomial" if multiclass else "binomial")
        model = lr.fit(fit_rows.withColumn(task, F.col(task).cast("double")))
        scored = model.transform(test_rows.where(F.col(task) >= 0) if multiclass else test_rows)
        rows = scored.select(F.col(task), vector_to_array("probability").alias("p")).collect()
        y = np.array([r[0] for r in rows], dtype=np.int64)
        p = np.array([r[1] for r in rows], dtype=np.float64)
        if multiclass:
            if p.shape[1] < n_classes:  # classes above the largest train label get probability 0
                p = np.pad(p, ((0, 0), (0, n_classes - p.shape[1])))
            out[task] = M.multiclass_metrics(y, p)
        else:
            p = p[:, 1]
            out[task] = M.binary_metrics(y, p)
            if linear_out is not None:
                linear_out[task] = {"weight": [model.coefficients.toArray().tolist()], "bias": [model.intercept]}
        labels_out[task], probs_out[task] = y, p
    if predictions_to:
        from userlens.models.training import save_predictions

        save_predictions(predictions_to, labels_out, probs_out)
    return out


def standardized_linear(linear: dict[str, dict[str, list]], features: FeatureSpec) -> dict[str, dict[str, list]]:
    """A linear model of x = log1p(features) rewritten for the model's standardized input
    z = (x - mean) / std: weight w * std, bias b + w . mean (the same logits)."""
    import numpy as np

    mean, std = np.asarray(features.mean), np.asarray(features.std)
    out = {}
    for task, m in linear.items():
        w, b = np.asarray(m["weight"], np.float64), np.asarray(m["bias"], np.float64)
        out[task] = {"weight": (w * std).tolist(), "bias": (b + w @ mean).tolist()}
    return out


def _log_mlflow(settings: Settings, job: dict[str, Any], summary: dict[str, Any],
                baseline: dict[str, dict[str, float]], artifact: str) -> None:
    import mlflow

    cfg = settings.train.mlflow
    if cfg.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name=job["version"]):
        mlflow.log_params({k: job[k] for k in ("batch_size", "epochs", "patience", "learning_rate",
                                               "weight_decay", "seed", "snapshot_id")})
        for prefix, metrics in (("model", summary["test"]), ("baseline", baseline)):
            for task, values in metrics.items():
                mlflow.log_metrics({f"{prefix}.{task}.{k}": float(v) for k, v in values.items()
                                    if isinstance(v, (int, float))})
        if "://" not in artifact:
            mlflow.log_artifacts(artifact, artifact_path="model")
