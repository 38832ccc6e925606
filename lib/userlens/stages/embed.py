"""Embed: ``user_texts`` -> ``user_embeddings`` and ``items`` -> ``item_embeddings``.

Incremental: a row is embedded only when its (key, text_hash, model_id) is not
already stored; a new model id re-embeds everything. Each distinct text_hash is
embedded once per run (a text some stored row already has for this model is
reused: :func:`userlens.embedding.vectors_for`) and joined back to every row that
has it. Empty texts are skipped and counted. How the encoder runs in Spark, on CPU
and GPU, is :mod:`userlens.embedding`'s docstring.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from userlens.config import Settings
from userlens.embedding import (
    ARROW_BATCH_KEY,
    Embedder,
    EncoderSpec,
    is_empty_text,
    item_texts,
    user_vectors,
    vectors_for,
    with_user_vectors,
)
from userlens.errors import UserlensError, require_columns
from userlens.runs import RunRecord, StageRun
from userlens.tables import Tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

EMBED, UNCHANGED, EMPTY = "embed", "unchanged", "empty"


def tag_changes(
    current: DataFrame, stored: DataFrame, key: str, model_id: str, hashes: tuple[str, ...] = ("text_hash",)
) -> DataFrame:
    """``current`` plus ``status``: empty (blank text), unchanged ((key, every hash in ``hashes``, model_id)
    stored; a null hash matches a null one) or embed."""
    require_columns(current, (key, "text", *hashes), "tag_changes")
    done = stored.where(F.col("model_id") == model_id).select(
        F.col(key).alias("_k"), *[F.col(h).alias(f"_{h}") for h in hashes], F.lit(True).alias("_stored")
    )
    same = [F.col(key) == F.col("_k"), *[F.col(h).eqNullSafe(F.col(f"_{h}")) for h in hashes]]
    joined = current.join(done, same, "left").drop("_k", *[f"_{h}" for h in hashes])
    status = (
        F.when(is_empty_text("text"), F.lit(EMPTY)).when(F.col("_stored"), F.lit(UNCHANGED)).otherwise(F.lit(EMBED))
    )
    return joined.withColumn("status", status).drop("_stored")


# --------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedCounts:
    rows: int = 0
    embedded: int = 0  # rows written with a new embedding
    texts_embedded: int = 0  # distinct texts run through the model
    unchanged: int = 0  # skipped: (key, text_hash, model_id) already stored
    empty: int = 0  # skipped: null or blank text


@dataclass(frozen=True)
class EmbedResult:
    as_of_date: dt.date
    model_id: str
    users: EmbedCounts
    items: EmbedCounts
    device: str = "auto"
    encoder: dict[str, float] = field(default_factory=dict)  # EncodeStats.summary() of the run's model steps

    def run_record(self) -> RunRecord:
        users, items = self.users, self.items
        return RunRecord(
            users.rows,
            users.embedded,
            {
                "model_id": self.model_id,
                "device": self.device,
                "users_embedded": users.embedded,
                "user_texts_embedded": users.texts_embedded,
                "users_unchanged": users.unchanged,
                "users_empty": users.empty,
                "items_in": items.rows,
                "items_embedded": items.embedded,
                "item_texts_embedded": items.texts_embedded,
                "items_unchanged": items.unchanged,
                "items_empty": items.empty,
                **({"encoder": self.encoder} if self.encoder else {}),
            },
        )


def _embed_changes(
    tables: Tables,
    embedder: Embedder,
    current: DataFrame,
    stored: DataFrame,
    key: str,
    model_id: str,
    table: str,
    output: Callable[[DataFrame], DataFrame],
    state: bool = False,
) -> EmbedCounts:
    """Tag, embed the distinct changed texts (with ``state``, the users' state texts too), join back and
    MERGE into ``table``."""
    hashes = ("text_hash", "state_hash") if state else ("text_hash",)
    tagged = tag_changes(current, stored, key, model_id, hashes).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {r["status"]: r["n"] for r in tagged.groupBy("status").agg(F.count(F.lit(1)).alias("n")).collect()}
        rows, to_embed = sum(counts.values()), counts.get(EMBED, 0)
        if to_embed == 0:
            return EmbedCounts(rows, 0, 0, counts.get(UNCHANGED, 0), counts.get(EMPTY, 0))
        changed = tagged.where(F.col("status") == EMBED)
        if state:
            vectors = user_vectors(embedder, changed, stored, model_id, state=True)
        else:
            vectors = vectors_for(embedder, changed, stored, model_id)
        try:
            joined = with_user_vectors(changed, vectors.frame, state).withColumn("model_id", F.lit(model_id))
            written = tables.merge(table, output(joined))
        finally:
            vectors.release()
        texts_embedded = vectors.embedded
    finally:
        tagged.unpersist()
    embedded = written.get("numTargetRowsInserted", 0) + written.get("numTargetRowsUpdated", 0)
    if embedded != to_embed:
        raise UserlensError(f"embed accounting failed for {table}: {to_embed} rows to embed but {embedded} written")
    return EmbedCounts(rows, embedded, texts_embedded, counts.get(UNCHANGED, 0), counts.get(EMPTY, 0))


def run_embed(spark: "SparkSession", settings: Settings, run: StageRun, as_of: dt.date | None = None) -> EmbedResult:
    """Embed changed user texts of ``as_of`` (default: the latest) and changed item texts."""
    model_id = EncoderSpec.from_settings(settings.embed).model_id  # before any job
    embedder = Embedder(spark, settings)  # GPU settings checked before any job too
    tables = Tables(spark, settings.storage)
    as_of = tables.as_of_date("user_texts", "as_of_date", "textualize", as_of)
    run.as_of_date = as_of
    texts = tables.read("user_texts").where(F.col("as_of_date") == F.lit(as_of))
    log.info("embed: user texts as of %s with %s on %s", as_of, model_id, settings.embed.device)

    previous_batch = spark.conf.get(ARROW_BATCH_KEY, None)
    spark.conf.set(ARROW_BATCH_KEY, str(settings.embed.arrow_batch_size))
    try:
        state = settings.textualize.state.enabled
        users = _embed_changes(
            tables,
            embedder,
            texts.select("user_key", "as_of_date", "text", "text_hash", "state_text", "state_hash"),
            tables.read("user_embeddings"),
            "user_key",
            model_id,
            "user_embeddings",
            lambda df: df.select(
                "user_key",
                "as_of_date",
                "text_hash",
                "model_id",
                "embedding",
                "state_hash",
                F.col("state_embedding") if state else F.lit(None).alias("state_embedding"),
            ),
            state,
        )
        if users.rows == 0:
            raise UserlensError(f"no user_texts for {as_of}: run `userlens textualize --date {as_of}` first")
        items = EmbedCounts()
        if settings.embed.items and tables.exists("items"):
            items = _embed_changes(
                tables,
                embedder,
                item_texts(tables.read("items"), settings.embed.item_text_fields),
                tables.read("item_embeddings"),
                "item_id",
                model_id,
                "item_embeddings",
                lambda df: df.select("item_id", "model_id", "text_hash", "embedding"),
            )
    finally:
        if previous_batch is None:
            spark.conf.unset(ARROW_BATCH_KEY)
        else:
            spark.conf.set(ARROW_BATCH_KEY, previous_batch)

    log.info(
        "embed: %d user rows: %d embedded (%d distinct texts), %d unchanged, %d empty; items: %d embedded, "
        "%d unchanged, %d empty",
        users.rows,
        users.embedded,
        users.texts_embedded,
        users.unchanged,
        users.empty,
        items.embedded,
        items.unchanged,
        items.empty,
    )
    encoder = embedder.stats.value.summary() if embedder.stats.value.texts else {}
    if encoder:
        log.info(
            "embed: %d texts, %.0f texts/s, %.0f tokens/s; padding %.1f%% of the tokens computed; the device "
            "busy %.0f%% of the model steps' wall time",
            encoder["texts"],
            encoder["texts_per_s"],
            encoder["tokens_per_s"],
            100 * encoder["padding_waste"],
            100 * encoder["device_busy"],
        )
    return EmbedResult(as_of, model_id, users, items, settings.embed.device, encoder)
