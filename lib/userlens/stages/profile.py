"""Profile: embeddings + scores + segments + interests + RFM -> ``user_profiles`` (MERGE, change data feed on).

* **segments**: Spark MLlib k-means on the user embeddings (``profile.segments``
  clusters), refit when the newest segment model is ``profile.segment_refit_days``
  old or was fitted on another encoder; otherwise the saved model assigns the
  users. Each segment is described by its members' most common top category;
  a segment with fewer than ``privacy.min_segment_size`` users is not published
  (``segment_id`` null in profiles, ``published = false`` and no categories in
  ``segments``), and is counted.
* **interests**: each user's top categories, every event weighted by
  ``0.5 ** (age_days / interest_half_life_days)`` (Spark SQL).
* **RFM**: recency_days, frequency_30d (events) and monetary_30d (purchase spend) as of D.

One row per user; only rows whose content changed are rewritten, and only those
get a new ``updated_at`` (the MERGE ignores ``updated_at`` when comparing), so
a second run for the same date writes nothing.

Table properties of ``user_profiles`` name the models behind its rows and their
differential privacy (:func:`model_properties`): ``userlens.model_version``,
``userlens.dp`` (``dp-sgd``, ``none`` or ``unknown``) and, for DP-SGD,
``userlens.dp.epsilon`` / ``userlens.dp.delta``; set only when they change.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from userlens.artifacts import ModelStore
from userlens.config import Settings
from userlens.errors import UserlensError
from userlens.features import latest_per_user
from userlens.privacy import model_properties
from userlens.runs import RunRecord, StageRun
from userlens.segments import SegmentModel, assign_segments, quality_segments, reusable_segment_model
from userlens.tables import Tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def interests(events: DataFrame, as_of: dt.date, top: int, half_life_days: float) -> DataFrame:
    """(user_key, top_categories array<string>): recency-weighted category counts up to ``as_of``."""
    age = F.datediff(F.lit(as_of), F.col("event_date"))
    weighted = (
        events.where((F.col("event_date") <= F.lit(as_of)) & F.col("category").isNotNull())
        .groupBy("user_key", "category")
        .agg(F.sum(F.pow(F.lit(0.5), age / F.lit(half_life_days))).alias("w"))
    )
    ranked = weighted.withColumn(
        "rank", F.row_number().over(Window.partitionBy("user_key").orderBy(F.desc("w"), "category"))
    ).where(F.col("rank") <= top)
    return ranked.groupBy("user_key").agg(
        F.transform(F.array_sort(F.collect_list(F.struct("rank", "category"))), lambda x: x["category"]).alias(
            "top_categories"
        )
    )


def rfm(events: DataFrame, as_of: dt.date) -> DataFrame:
    """(user_key, recency_days, frequency_30d, monetary_30d) as of ``as_of``."""
    c = F.lit(as_of)
    known = events.where(F.col("event_date") <= c)
    last30 = F.col("event_date") > F.date_sub(c, 30)
    spend = F.when(
        last30 & (F.col("event_type") == "purchase"), F.coalesce("price", F.lit(0.0)) * F.coalesce("quantity", F.lit(1))
    )
    return known.groupBy("user_key").agg(
        F.datediff(c, F.max("event_date")).alias("recency_days"),
        F.sum(F.when(last30, 1).otherwise(0)).cast("long").alias("frequency_30d"),
        F.round(F.coalesce(F.sum(spend), F.lit(0.0)), 2).alias("monetary_30d"),
    )


def segment_model(
    spark: "SparkSession", settings: Settings, embeddings: DataFrame, model_id: str, as_of: dt.date
) -> SegmentModel:
    """The current k-means model: reused while young enough and on the same encoder, else refitted."""
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    cfg = settings.profile
    store = ModelStore.of(settings)
    reused = reusable_segment_model(settings, model_id, as_of)
    if reused is not None:
        return reused
    version = f"seg-{as_of.isoformat()}"
    vectors = embeddings.select(array_to_vector(F.col("embedding")).alias("x"))
    n = vectors.count()
    if n < cfg.segments:
        raise UserlensError(f"profile: {n} users with embeddings, fewer than profile.segments={cfg.segments}")
    model = KMeans(k=cfg.segments, seed=7, featuresCol="x", maxIter=50).fit(vectors)
    model.write().overwrite().save(f"{store.segment_path(version)}/kmeans")
    store.publish_segments(
        version, {"as_of_date": as_of.isoformat(), "embed_model_id": model_id, "k": cfg.segments, "users": n}
    )
    log.info("profile: fitted %d segments on %d users (%s)", cfg.segments, n, version)
    return SegmentModel(model, version, True)


def describe_segments(
    assigned: DataFrame, user_interests: DataFrame, min_size: int, as_of: dt.date, version: str, top: int = 3
) -> DataFrame:
    """segments rows: size, published (size >= min_size) and, when published, the top categories."""
    first = user_interests.select("user_key", F.element_at("top_categories", 1).alias("category"))
    sizes = assigned.groupBy("segment_id").agg(F.count(F.lit(1)).alias("users"))
    cats = (
        assigned.join(first, "user_key")
        .where(F.col("category").isNotNull())
        .groupBy("segment_id", "category")
        .count()
        .withColumn("rank", F.row_number().over(Window.partitionBy("segment_id").orderBy(F.desc("count"), "category")))
        .where(F.col("rank") <= top)
        .groupBy("segment_id")
        .agg(
            F.transform(F.array_sort(F.collect_list(F.struct("rank", "category"))), lambda x: x["category"]).alias(
                "cats"
            )
        )
    )
    published = F.col("users") >= min_size
    return sizes.join(cats, "segment_id", "left").select(
        "segment_id",
        F.lit(as_of).alias("as_of_date"),
        F.col("users").cast("long").alias("users"),
        published.alias("published"),
        F.when(published, F.col("cats")).alias("top_categories"),
        F.lit(version).alias("model_version"),
    )


def _training_dp(settings: Settings, version: str) -> dict[str, Any] | None:
    metrics = ModelStore.of(settings).metrics(version)
    if metrics is None:
        return None
    return metrics.training.dp or {}


def record_model_properties(tables: Tables, settings: Settings) -> dict[str, str | None]:
    """Set the :func:`model_properties` of the versions in ``user_profiles``; returns them."""
    versions = [
        r[0]
        for r in tables.read("user_profiles")
        .where(F.col("model_version").isNotNull())
        .select("model_version")
        .distinct()
        .collect()
    ]
    properties = model_properties({v: _training_dp(settings, v) for v in versions})
    tables.set_properties("user_profiles", properties)
    return properties


@dataclass(frozen=True)
class ProfileResult:
    as_of_date: dt.date
    users: int
    inserted: int
    updated: int
    segments_published: int
    segments_suppressed: int
    users_in_suppressed_segments: int
    segment_model: str
    segments_refitted: bool
    min_segment_size: int = 0
    model_properties: dict[str, str] = field(default_factory=dict)
    scores_version: int | None = None  # the user_scores version published (the quality gate's reference)
    quality_by_segment_of: str | None = None  # the model whose quality by segment was (re)computed, if any

    def run_record(self) -> RunRecord:
        return RunRecord(
            self.users,
            self.inserted + self.updated,
            {
                "inserted": self.inserted,
                "updated": self.updated,
                "segments_published": self.segments_published,
                "segments_suppressed": self.segments_suppressed,
                "users_in_suppressed_segments": self.users_in_suppressed_segments,
                "segment_model": self.segment_model,
                "segments_refitted": self.segments_refitted,
                "min_segment_size": self.min_segment_size,
                "model_properties": self.model_properties,
                "scores_version": self.scores_version,
                "quality_by_segment_of": self.quality_by_segment_of,
            },
        )


def quality_by_segment(settings: Settings, seg: SegmentModel, published_ids: list[int], model_id: str) -> str | None:
    """The published model's quality by the segments published tonight (``metrics.json`` ``by_group``,
    :mod:`userlens.models.quality`), computed on its test split when it was computed for another segment
    model or none (a model trained before the first segments, or a refit). Returns the model version it was
    written for, None when there was nothing to do (no model, up to date, another encoder, no snapshot)."""
    from userlens.models.quality import quality_line
    from userlens.models.storage import exists
    from userlens.models.training import write_quality_by_group

    store = ModelStore.of(settings)
    version = store.latest()
    metrics = store.metrics(version) if version is not None else None
    if version is None or metrics is None:
        return None
    done = (metrics.by_group or {}).get("segment", {}).get("segment_model_version")
    if done == seg.version or metrics.data.embed_model_id != model_id:
        return None
    path, snapshot = store.path(version), store.snapshot(metrics.snapshot_id)
    if not exists(f"{snapshot}/split=test"):
        log.warning("profile: model %s's snapshot is gone: its quality by segment is not computed", version)
        return None
    by_group = write_quality_by_group(
        path,
        snapshot,
        settings.train.recommend.k,
        settings.privacy.min_segment_size,
        quality_segments(seg.model, seg.version, published_ids),
    )
    log.info("profile: model %s quality by group: %s", version, quality_line(by_group))
    return version


def run_profile(
    spark: "SparkSession", settings: Settings, run: StageRun, as_of: dt.date | None = None
) -> ProfileResult:
    """Assemble and MERGE ``user_profiles`` for ``as_of`` (default: the newest embedding date)."""
    from pyspark import StorageLevel

    pending = ModelStore.of(settings).candidate()
    if settings.gate.enabled and pending is not None:
        raise UserlensError(
            f"model {pending} is a candidate the quality gate has not passed: run `userlens gate` "
            "(the nightly does), or `userlens publish --force` after a look"
        )
    tables = Tables(spark, settings.storage)
    as_of = tables.as_of_date("user_embeddings", "as_of_date", "embed", as_of)
    run.as_of_date = as_of
    embeddings = (
        tables.read("user_embeddings")
        .where(F.col("as_of_date") <= F.lit(as_of))
        .select("user_key", "model_id", "embedding")
    )
    model_ids = [r[0] for r in embeddings.select("model_id").distinct().collect()]
    if len(model_ids) != 1:
        raise UserlensError(
            f"user_embeddings holds {len(model_ids)} encoders ({', '.join(model_ids)}): "
            "run `userlens embed` to bring every user to the configured model"
        )
    events = tables.read("events")
    cached: list[DataFrame] = []

    def cache(df: DataFrame) -> DataFrame:
        cached.append(df.persist(StorageLevel.MEMORY_AND_DISK))
        return cached[-1]

    try:
        embeddings = cache(embeddings)
        seg = segment_model(spark, settings, embeddings, model_ids[0], as_of)
        assigned = cache(assign_segments(seg.model, embeddings))
        user_interests = cache(
            interests(events, as_of, settings.profile.interests, settings.profile.interest_half_life_days)
        )
        segments = cache(
            describe_segments(assigned, user_interests, settings.privacy.min_segment_size, as_of, seg.version)
        )
        tables.merge("segments", segments)
        seg_rows = segments.select("segment_id", "users", "published").collect()
        published_ids = [r["segment_id"] for r in seg_rows if r["published"]]
        # read at one version, recorded: the quality gate compares the next night with what was published
        scores_version = tables.version("user_scores") if tables.exists("user_scores") else None
        all_scores = (
            tables.read("user_scores") if scores_version is None else tables.read_version("user_scores", scores_version)
        )
        scores = latest_per_user(all_scores.where(F.col("as_of_date") <= F.lit(as_of)), "as_of_date")
        profile = (
            embeddings.select("user_key", "embedding")
            .join(
                scores.select(
                    "user_key",
                    "purchase_propensity",
                    "churn_risk",
                    "next_category",
                    "recommended_items",
                    "model_version",
                ),
                "user_key",
                "left",
            )
            .join(user_interests, "user_key", "left")
            .join(assigned, "user_key", "left")
            .join(rfm(events, as_of), "user_key", "left")
            .select(
                "user_key",
                F.lit(as_of).alias("as_of_date"),
                "embedding",
                "purchase_propensity",
                "churn_risk",
                "next_category",
                "top_categories",
                F.when(F.col("segment_id").isin(published_ids), F.col("segment_id")).alias("segment_id"),
                "recommended_items",
                "recency_days",
                "frequency_30d",
                "monetary_30d",
                "model_version",
                F.current_timestamp().alias("updated_at"),
                F.lit(model_ids[0]).alias("embedding_model_id"),
                F.when(F.col("segment_id").isin(published_ids), F.lit(seg.version)).alias("segment_model_version"),
            )
        )
        metrics = tables.merge("user_profiles", profile, ignore_changes=("updated_at",))
        users = embeddings.count()
    finally:
        for df in cached:
            df.unpersist()
    properties = record_model_properties(tables, settings)
    quality_for = quality_by_segment(settings, seg, published_ids, model_ids[0])
    suppressed = [r for r in seg_rows if not r["published"]]
    result = ProfileResult(
        as_of,
        users,
        metrics.get("numTargetRowsInserted", 0),
        metrics.get("numTargetRowsUpdated", 0),
        len(published_ids),
        len(suppressed),
        sum(r["users"] for r in suppressed),
        seg.version,
        seg.fitted,
        settings.privacy.min_segment_size,
        {k: v for k, v in properties.items() if v is not None},
        scores_version,
        quality_for,
    )
    log.info(
        "profile: %d users as of %s (%d new, %d changed rows); %d segments published, %d suppressed "
        "(%d users, below privacy.min_segment_size=%d)",
        users,
        as_of,
        result.inserted,
        result.updated,
        result.segments_published,
        result.segments_suppressed,
        result.users_in_suppressed_segments,
        settings.privacy.min_segment_size,
    )
    return result
