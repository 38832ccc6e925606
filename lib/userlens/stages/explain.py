"""Explain: for a sample of the night's scored users (``explain.users``), the days that moved each score most.

Occlusion over days: a user's score is computed again without one active day at a time (the day's
events leave both the text, rendered again by textualize's own code, and the numeric features), and a
day's weight is the score with it minus the score without it: positive when the day raised the score.
The ``explain.top`` days of largest weight per binary task (purchase, churn) are stored in
``user_scores.explanations`` as (day, the day's line of the user's text, task, weight).

Cost: one encoder pass per occluded day (at most ``explain.days`` per user) plus the Spark jobs of one
textualize and one score over those variants; bench/explain.py measures it per user. The nightly runs the
stage after profile, so a slow explanation never delays what is published; ``explain.users: none`` leaves
it out. Only users scored on the as-of date by the published model and not explained yet are explained, so
a second run for the same date writes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.artifacts import ModelStore
from userlens.config import Settings
from userlens.embedding import Embedder, user_vectors, with_user_vectors
from userlens.errors import UserlensError
from userlens.features import numeric_features
from userlens.models.tasks import BINARY_TASKS
from userlens.runs import RunRecord, StageRun
from userlens.tables import Tables
from userlens.text.user_texts import build_user_texts

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

SEP = "|"  # variant key: user_key|day left out ("" for the full history)
LINE_CHARS = 300  # an explanation's text: the day's line of the user's text, cut to this length
PROBS_SCHEMA = T.StructType(
    [T.StructField("vkey", T.StringType()), *[T.StructField(t, T.DoubleType()) for t in BINARY_TASKS]]
)


@dataclass(frozen=True)
class ExplainResult:
    as_of_date: dt.date
    model_version: str | None
    users: int  # users explained
    variants: int  # texts scored (each user's full history and one per day left out)
    scores_version: int | None = None  # user_scores after the write (the quality gate's reference)

    def run_record(self) -> RunRecord:
        return RunRecord(
            self.users,
            self.users,
            {
                "model_version": self.model_version,
                "variants": self.variants,
                "scores_version": self.scores_version,
            },
        )


def _probabilities_fn(path: str):
    def probabilities(batches: Iterator["pa.RecordBatch"]) -> Iterator["pa.RecordBatch"]:
        import numpy as np
        import pyarrow as pa

        from userlens.models.predictor import load_artifact, predict_batch

        artifact = load_artifact(path)
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            probs = predict_batch(artifact, batch)
            out = {"vkey": batch.column("vkey")}
            for task in BINARY_TASKS:
                out[task] = pa.array(probs[task].astype(np.float64)) if task in probs else pa.nulls(n, pa.float64())
            yield pa.RecordBatch.from_pydict(out)

    return probabilities


def occluded_events(events: DataFrame, users: DataFrame, days: int) -> DataFrame:
    """The events of ``users``: once whole (key ``user_key|``) and once without each of their ``days`` most
    recent active days (key ``user_key|YYYY-MM-DD``)."""
    theirs = events.join(users, "user_key")
    recent = Window.partitionBy("user_key").orderBy(F.desc("_out"))
    left_out = (
        theirs.select("user_key", F.col("event_date").alias("_out"))
        .distinct()
        .withColumn("_rank", F.row_number().over(recent))
        .where(F.col("_rank") <= days)
        .drop("_rank")
    )
    whole = theirs.withColumn("_out", F.lit(""))
    without = theirs.join(left_out, "user_key").where(F.col("event_date") != F.col("_out"))
    return (
        whole.unionByName(without.withColumn("_out", F.col("_out").cast("string")))
        .withColumn("user_key", F.concat_ws(SEP, "user_key", "_out"))
        .drop("_out")
    )


def day_lines(text: str) -> dict[str, str]:
    """The lines of a user text that start with a date (one per active day), by date."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^(\d{4}-\d{2}-\d{2})\b", line.strip())
        if match:
            found[match.group(1)] = line.strip()[:LINE_CHARS]
    return found


def run_explain(
    spark: "SparkSession", settings: Settings, run: StageRun, as_of: dt.date | None = None
) -> ExplainResult:
    """Explain the scores of up to ``explain.sample_size`` users (``explain.users: all``: every user) scored
    on ``as_of`` by the published model; MERGE the explanations into their user_scores rows."""
    from userlens.models.predictor import load_artifact

    cfg = settings.explain
    tables = Tables(spark, settings.storage)
    as_of = tables.as_of_date("user_scores", "as_of_date", "score", as_of)
    run.as_of_date = as_of
    store = ModelStore.of(settings)
    version = store.latest()
    if version is None:
        raise UserlensError(f"no published model in {store.root}: run `userlens train` first")
    if cfg.users == "none":
        return ExplainResult(as_of, version, 0, 0)
    artifact = load_artifact(store.path(version))
    scored = tables.read("user_scores").where(
        (F.col("as_of_date") == F.lit(as_of)) & (F.col("model_version") == F.lit(version))
    )
    if cfg.users == "sample":  # the same users whenever they are scored: the smallest hashes of their keys
        scored = scored.orderBy(F.xxhash64("user_key"), "user_key").limit(cfg.sample_size)
    users = scored.where(F.col("explanations").isNull()).select("user_key").localCheckpoint()
    n_users = users.count()
    if n_users == 0:
        return ExplainResult(as_of, version, 0, 0, tables.version("user_scores"))

    types = settings.ingest.event_types
    events = tables.read("events").where(F.col("event_date") <= F.lit(as_of))
    variants = occluded_events(events, users, cfg.days).localCheckpoint()
    texts = build_user_texts(variants, tables.read("items"), settings.textualize, types, as_of).select(
        F.col("user_key").alias("vkey"), "text", "text_hash", "state_text", "state_hash"
    )
    texts = texts.localCheckpoint()
    state = "state" in artifact.features.views  # a day left out changes the state text too
    vectors = user_vectors(
        Embedder(spark, settings), texts, tables.read("user_embeddings"), artifact.features.embed_model_id, state
    )
    try:
        feats = numeric_features(variants, as_of, types).withColumnRenamed("user_key", "vkey")
        inputs = with_user_vectors(texts, vectors.frame, state).join(feats, "vkey")
        probs = inputs.select("vkey", "embedding", *(["state_embedding"] if state else []), "features").mapInArrow(
            _probabilities_fn(store.path(version)), PROBS_SCHEMA
        )
        split = F.split("vkey", re.escape(SEP))
        scored = probs.select(split[0].alias("user_key"), split[1].alias("day"), *BINARY_TASKS).localCheckpoint()
        n_variants = scored.count()
    finally:
        vectors.release()
    full = scored.where(F.col("day") == "").select("user_key", *[F.col(t).alias(f"_full_{t}") for t in BINARY_TASKS])
    lines = F.udf(lambda text: day_lines(text or ""), T.MapType(T.StringType(), T.StringType()))
    whole_text = texts.where(F.col("vkey").endswith(SEP)).select(
        F.regexp_replace("vkey", re.escape(SEP) + "$", "").alias("user_key"), lines("text").alias("_lines")
    )
    weights = (
        scored.where(F.col("day") != "")
        .join(full, "user_key")
        .join(whole_text, "user_key", "left")
        .select(
            "user_key",
            F.col("day").cast("date").alias("day"),
            F.coalesce(F.element_at("_lines", F.col("day")), F.col("day")).alias("text"),
            F.explode(
                F.array(
                    *[
                        F.struct(F.lit(t).alias("task"), (F.col(f"_full_{t}") - F.col(t)).alias("weight"))
                        for t in BINARY_TASKS
                    ]
                )
            ).alias("_w"),
        )
        .select("user_key", "day", "text", "_w.task", "_w.weight")
        .where(F.col("weight").isNotNull())
    )
    ranked = weights.withColumn(
        "_rank",
        F.row_number().over(Window.partitionBy("user_key", "task").orderBy(F.desc(F.abs("weight")), "day")),
    ).where(F.col("_rank") <= cfg.top)
    explanations = ranked.groupBy("user_key").agg(
        F.transform(
            F.array_sort(F.collect_list(F.struct("task", "_rank", "day", "text", "weight"))),
            lambda e: F.struct(
                e["day"].alias("day"), e["text"].alias("text"), e["task"].alias("task"), e["weight"].alias("weight")
            ),
        ).alias("explanations")
    )
    source = explanations.withColumn("as_of_date", F.lit(as_of))
    (
        tables.delta("user_scores")
        .alias("t")
        .merge(source.alias("s"), "t.user_key = s.user_key AND t.as_of_date = s.as_of_date")
        .whenMatchedUpdate(set={"explanations": "s.explanations"})
        .execute()
    )
    result = ExplainResult(as_of, version, n_users, n_variants, tables.version("user_scores"))
    log.info("explain: %d users as of %s (%d variants scored, model %s)", result.users, as_of, result.variants, version)
    return result
