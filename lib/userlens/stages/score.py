"""Score: the serving model over user embeddings + numeric features as of D -> ``user_scores``.

The serving model is the candidate a new training made while the quality gate has not yet passed it
(:mod:`userlens.stages.gate`), else the published one (LATEST).

Incremental: a user is scored when its (text_hash, model_version) differs from
its newest row in ``user_scores`` (a new text, hence a new embedding, or a new
model); everyone is scored when the model version changed. The numeric
features are computed as of D (the model predicts the ``horizon_days`` after
D), so a user without new events keeps the score of the day their text last
changed: recency alone does not trigger a rescore.

The model is loaded once per Python worker (``_artifact``) from the model
directory, which every executor must be able to read (a shared path or an
object store URI). Scoring runs in ``mapInArrow``: the embedding and feature
arrays are flattened from Arrow buffers, never built row by row in Python.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.artifacts import ModelStore
from userlens.config import Settings
from userlens.errors import UserlensError
from userlens.features import item_history, latest_per_user, numeric_features
from userlens.runs import RunRecord, StageRun
from userlens.tables import Tables

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

SCORES_SCHEMA = T.StructType(
    [
        T.StructField("user_key", T.StringType()),
        T.StructField("purchase_propensity", T.DoubleType()),
        T.StructField("churn_risk", T.DoubleType()),
        T.StructField("next_category", T.StringType()),
        T.StructField("next_category_p", T.DoubleType()),
        T.StructField("recommended_items", T.ArrayType(T.StringType())),
    ]
)
_LOADED: dict[str | tuple[str, str], Any] = {}  # path -> artifact, ("rec", path) -> its recommender


def _artifact(path: str) -> Any:
    """The artifact at ``path``, loaded once per Python worker process."""
    from userlens.models.predictor import load_artifact

    if path not in _LOADED:
        _LOADED.clear()
        _LOADED[path] = load_artifact(path)
    return _LOADED[path]


def _recommender(artifact: Any) -> Any:
    """The artifact's catalogue (item ids -> indices, history arrays), once per worker; None without a
    recommendation head."""
    if artifact.model.rec is None:
        return None
    key = ("rec", artifact.path)
    if key not in _LOADED:
        from userlens.models.training import serving_catalogue

        _LOADED[key] = serving_catalogue(artifact)
    return _LOADED[key]


def _recommend(artifact: Any, batch: "pa.RecordBatch", k: int, block_bytes: int) -> "pa.Array":
    """Top-k item ids per user (earlier purchases excluded), as an Arrow list array, from the model's
    recommender (the head, fused with ALS where the model has a fusion); scores are computed
    ``block_bytes`` at a time."""
    import numpy as np
    import pyarrow as pa

    from userlens.models.sequential import top_items

    catalogue = _recommender(artifact)
    assert catalogue is not None  # called only for an artifact with a recommendation head
    arrays = catalogue.arrays(batch)
    top = top_items(
        artifact.model.rec, arrays["hist_idx"], catalogue.pad, arrays["bought"], k, block_bytes, artifact.fusion
    )
    ids = np.array(catalogue.item_ids, dtype=object)
    offsets = np.concatenate([[0], np.cumsum((top >= 0).sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[top[top >= 0]].tolist(), pa.string()))


def _score_fn(path: str, k: int, block_bytes: int):
    def score_batches(batches: Iterator["pa.RecordBatch"]) -> Iterator["pa.RecordBatch"]:
        import numpy as np
        import pyarrow as pa

        from userlens.models.predictor import predict_batch

        artifact = _artifact(path)
        classes = np.array(artifact.config.classes, dtype=object)
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            probs = predict_batch(artifact, batch)
            out = {"user_key": batch.column("user_key")}
            for task, column in (("purchase", "purchase_propensity"), ("churn", "churn_risk")):
                out[column] = pa.array(probs[task].astype(np.float64)) if task in probs else pa.nulls(n, pa.float64())
            if "next_category" in probs:
                best = probs["next_category"].argmax(axis=1)
                out["next_category"] = pa.array(classes[best].tolist(), pa.string())
                out["next_category_p"] = pa.array(probs["next_category"].max(axis=1).astype(np.float64))
            else:
                out["next_category"], out["next_category_p"] = pa.nulls(n, pa.string()), pa.nulls(n, pa.float64())
            out["recommended_items"] = (
                _recommend(artifact, batch, k, block_bytes)
                if artifact.model.rec is not None
                else pa.nulls(n, pa.list_(pa.string()))
            )
            yield pa.RecordBatch.from_pydict(out)

    return score_batches


def score_users(users: DataFrame, artifact_path: str, k: int, block_mib: int) -> DataFrame:
    """(user_key, embedding, features[, state_embedding, hist_items, hist_ages, bought]) -> (user_key,
    purchase_propensity, churn_risk, next_category, next_category_p, recommended_items) with the model at
    ``artifact_path``; state_embedding is needed when the model reads the state view, the recommendation
    columns when it has a recommendation head; ``k`` and ``block_mib``:
    ``train.recommend.k`` and ``train.recommend.score_block_mib``."""
    extra = [c for c in ("state_embedding", "hist_items", "hist_ages", "bought") if c in users.columns]
    return users.select("user_key", "embedding", "features", *extra).mapInArrow(
        _score_fn(artifact_path, k, block_mib * 2**20), SCORES_SCHEMA
    )


@dataclass(frozen=True)
class ScoreResult:
    as_of_date: dt.date
    model_version: str
    users: int
    scored: int
    unchanged: int
    no_events: int
    no_state: int = 0  # users without a state embedding, for a model that reads one (zeros in its place)

    def run_record(self) -> RunRecord:
        return RunRecord(
            self.users,
            self.scored,
            {
                "model_version": self.model_version,
                "scored": self.scored,
                "unchanged": self.unchanged,
                "users_without_events": self.no_events,
                "users_without_state_embedding": self.no_state,
            },
        )


def require_model(settings: Settings) -> tuple[str, str]:
    """(version, path) of the model to score with: the candidate waiting for the quality gate while there is
    one, else the published model; one line naming `userlens train` when there is none."""
    store = ModelStore.of(settings)
    version = store.serving()
    if version is None:
        raise UserlensError(f"no model in {store.root}: run `userlens train` first")
    return version, store.path(version)


def run_score(spark: "SparkSession", settings: Settings, run: StageRun, as_of: dt.date | None = None) -> ScoreResult:
    """Score users whose embedding or model changed since their last score; MERGE into user_scores."""
    from pyspark import StorageLevel

    from userlens.models.predictor import load_artifact

    version, path = require_model(settings)
    artifact = load_artifact(path)  # on the driver only to check it (refuses other format versions)
    tables = Tables(spark, settings.storage)
    as_of = tables.as_of_date("user_embeddings", "as_of_date", "embed", as_of)
    events = tables.read("events")
    run.as_of_date = as_of
    model_id = artifact.features.embed_model_id
    embeddings = tables.read("user_embeddings").where(F.col("as_of_date") <= F.lit(as_of))
    wrong = embeddings.where(F.col("model_id") != model_id).limit(1).count()
    if wrong:
        raise UserlensError(
            f"user_embeddings were made with another encoder than model {version} "
            f"(trained on {model_id}): run `userlens embed` with that model, or `userlens train`"
        )
    feats = numeric_features(events, as_of, settings.ingest.event_types)
    state = ["state_embedding"] if "state" in artifact.features.views else []
    current = embeddings.select("user_key", "text_hash", "embedding", *state).join(feats, "user_key", "left")
    scored_before = latest_per_user(
        tables.read("user_scores").where(F.col("as_of_date") <= F.lit(as_of)), "as_of_date"
    ).select("user_key", F.col("text_hash").alias("_h"), F.col("model_version").alias("_v"))
    tagged = current.join(scored_before, "user_key", "left").withColumn(
        "_todo", F.col("_h").isNull() | (F.col("_h") != F.col("text_hash")) | (F.col("_v") != F.lit(version))
    )
    tagged = tagged.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = tagged.agg(
            F.count(F.lit(1)).alias("users"),
            F.sum(F.col("_todo").cast("int")).alias("todo"),
            F.sum(F.col("features").isNull().cast("int")).alias("no_features"),
            F.sum((F.col("state_embedding").isNull() if state else F.lit(False)).cast("int")).alias("no_state"),
        ).first()
        assert counts is not None  # an aggregate without groupBy has one row
        todo = tagged.where("_todo").withColumn(
            "features", F.coalesce("features", F.array_repeat(F.lit(0.0), len(artifact.features.names)))
        )
        if artifact.config.rec:  # the recommendation head reads the user's item history as of D
            empty = F.array().cast("array<string>")
            history = item_history(events, as_of, as_of, artifact.config.rec["max_len"]).drop("next_items")
            todo = todo.join(history, "user_key", "left").select(
                *todo.columns,
                F.coalesce("hist_items", empty).alias("hist_items"),
                F.coalesce("hist_ages", F.array().cast("array<int>")).alias("hist_ages"),
                F.coalesce("bought", empty).alias("bought"),
            )
        rec = settings.train.recommend
        scores = score_users(todo, path, rec.k, rec.score_block_mib)
        rows = scores.join(todo.select("user_key", "text_hash"), "user_key").select(
            "user_key",
            F.lit(as_of).alias("as_of_date"),
            F.lit(version).alias("model_version"),
            "text_hash",
            "purchase_propensity",
            "churn_risk",
            "next_category",
            "next_category_p",
            "recommended_items",
            F.current_timestamp().alias("scored_at"),
            F.lit(None).alias("explanations"),  # the explain stage fills a sample after profile
        )
        written = tables.merge("user_scores", rows) if (counts["todo"] or 0) > 0 else {}
    finally:
        tagged.unpersist()
    scored = written.get("numTargetRowsInserted", 0) + written.get("numTargetRowsUpdated", 0)
    result = ScoreResult(
        as_of,
        version,
        counts["users"],
        scored,
        counts["users"] - (counts["todo"] or 0),
        counts["no_features"] or 0,
        counts["no_state"] or 0,
    )
    log.info(
        "score: %d users as of %s with model %s: %d scored, %d unchanged",
        result.users,
        as_of,
        version,
        result.scored,
        result.unchanged,
    )
    if result.no_state:
        log.warning(
            "score: %d users have no state embedding (embedded before textualize.state): the model read zeros "
            "in its place; the next embed run gives them one",
            result.no_state,
        )
    return result
