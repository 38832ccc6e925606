"""Embed: ``user_texts`` -> ``user_embeddings`` and ``items`` -> ``item_embeddings``.

Incremental: a row is embedded only when its (key, text_hash, model_id) is not
already stored; a new model id re-embeds everything. Each distinct text_hash is
embedded once per run and joined back to every row that has it. Empty texts are
skipped and counted.

The model runs in ``mapInArrow``. Measured on 2 shared cores with MiniLM
(bench/embed.py, docs/benchmarks.md), the model step alone ran 9-11% faster as an
iterator pandas UDF (two runs, noisy machine; not yet explained). ``mapInArrow``
is kept for now because it returns the embeddings as one Arrow list column built
from a flat float32 buffer with no per-row Python object, which the GPU design
needs once the model is fast; re-measure on a quiet machine before settling.
The encoder is loaded once per Python worker
(:func:`userlens.models.encoder.cached_encoder`) and Spark reuses the worker
across tasks; nothing is loaded on the driver, and embeddings never reach it.

CPU: tokenizing and the forward pass are fused in one ``mapInArrow`` (a second
Arrow round trip would only add cost on the same cores).
GPU (``embed.device=cuda``): tokenizing runs in a CPU stage over all cores and
emits token-id arrays; a shuffle then feeds a forward-pass-only stage that runs
under a stage-level ``ResourceProfile`` asking for one GPU per task, so CPU
stages never hold a GPU and the GPU never waits for the tokenizer.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.config import EmbedSettings, Settings
from userlens.errors import ConfigError, UserlensError, require_columns
from userlens.models.encoder import GPU_KEY, Encoder, cached_encoder, describe_model
from userlens.runs import StageRun
from userlens.tables import VECTOR, Tables

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.resource import ResourceProfile
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

EXECUTOR_GPU_KEY = "spark.executor.resource.gpu.amount"
ARROW_BATCH_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"
# the table's vector type: float elements, never null (a cast cannot add that guarantee later)
VECTORS_SCHEMA = T.StructType([T.StructField("text_hash", T.StringType()), T.StructField("embedding", VECTOR)])
TOKENS_SCHEMA = T.StructType([T.StructField("text_hash", T.StringType()),
                              T.StructField("token_ids", T.ArrayType(T.IntegerType(), containsNull=False))])
EMBED, UNCHANGED, EMPTY = "embed", "unchanged", "empty"
# distinct texts per partition of the embedding step, past the cores of the cluster
TEXTS_PER_PARTITION = 20_000


@dataclass(frozen=True)
class EncoderSpec:
    """Plain values shipped to the workers; each worker loads (and caches) the model itself."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    max_batch_tokens: int = 16384
    normalize: bool = True
    int8: bool = False

    @classmethod
    def from_settings(cls, embed: EmbedSettings) -> "EncoderSpec":
        return cls(embed.model, embed.device, embed.dtype, embed.max_batch_tokens, embed.normalize, embed.cpu_int8)

    @property
    def model_id(self) -> str:
        """The id the vectors are stored under (files only: cheap enough for the driver)."""
        return describe_model(self.model, self.normalize, self.int8).model_id

    def load(self) -> Encoder:
        """This worker's encoder (loaded once per Python process)."""
        return cached_encoder(self.model, self.device, self.dtype, self.max_batch_tokens, self.normalize, self.int8)


# --------------------------------------------------------------------------
# worker functions (Arrow batches in, Arrow batches out)
# --------------------------------------------------------------------------
def _vectors_batch(text_hash: "pa.Array", vectors: "object") -> "pa.RecordBatch":
    import numpy as np
    import pyarrow as pa

    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    embedding = pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))
    return pa.RecordBatch.from_arrays([text_hash, embedding], names=["text_hash", "embedding"])


def _encode_texts_fn(spec: EncoderSpec) -> Callable[[Iterator["pa.RecordBatch"]], Iterator["pa.RecordBatch"]]:
    def encode_partition(batches: Iterator["pa.RecordBatch"]) -> Iterator["pa.RecordBatch"]:
        encoder = None
        for batch in batches:
            if batch.num_rows == 0:
                continue
            if encoder is None:  # loaded lazily: an empty partition loads nothing
                encoder = spec.load()
            texts = batch.column("text").to_pylist()
            yield _vectors_batch(batch.column("text_hash"), encoder.encode(texts))

    return encode_partition


def _tokenize_fn(model: str) -> Callable[[Iterator["pa.RecordBatch"]], Iterator["pa.RecordBatch"]]:
    def tokenize_partition(batches: Iterator["pa.RecordBatch"]) -> Iterator["pa.RecordBatch"]:
        import numpy as np
        import pyarrow as pa

        from userlens.models.encoder import cached_tokenizer

        for batch in batches:
            if batch.num_rows == 0:
                continue
            ids = cached_tokenizer(model).tokenize(batch.column("text").to_pylist())
            offsets = np.zeros(len(ids) + 1, dtype=np.int32)
            np.cumsum([len(row) for row in ids], out=offsets[1:])
            values = np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(offsets[-1]))
            token_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            yield pa.RecordBatch.from_arrays([batch.column("text_hash"), token_ids], names=["text_hash", "token_ids"])

    return tokenize_partition


def _encode_ids_fn(spec: EncoderSpec) -> Callable[[Iterator["pa.RecordBatch"]], Iterator["pa.RecordBatch"]]:
    def encode_partition(batches: Iterator["pa.RecordBatch"]) -> Iterator["pa.RecordBatch"]:
        encoder = None
        for batch in batches:
            if batch.num_rows == 0:
                continue
            if encoder is None:
                encoder = spec.load()
            column = batch.column("token_ids")
            offsets = column.offsets.to_numpy()
            values = column.values.to_numpy()
            ids = [values[offsets[i]:offsets[i + 1]] for i in range(len(column))]
            yield _vectors_batch(batch.column("text_hash"), encoder.encode_ids(ids))

    return encode_partition


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------
def is_empty_text(text: str) -> "F.Column":
    """True for a null or blank text (nothing for the model to read)."""
    return F.col(text).isNull() | (F.length(F.trim(F.col(text))) == 0)


def item_texts(items: DataFrame, fields: list[str]) -> DataFrame:
    """item_id, text (the non-blank fields joined by '. '), text_hash."""
    require_columns(items, ("item_id", *fields), "item_texts")
    parts = [F.when(F.length(F.trim(F.col(f))) > 0, F.trim(F.col(f))) for f in fields]
    text = F.concat_ws(". ", *parts)
    return items.select("item_id", text.alias("text")).withColumn("text_hash", F.sha2(F.col("text"), 256))


def tag_changes(current: DataFrame, stored: DataFrame, key: str, model_id: str) -> DataFrame:
    """``current`` plus ``status``: empty (blank text), unchanged ((key, text_hash, model_id) stored) or embed."""
    require_columns(current, (key, "text", "text_hash"), "tag_changes")
    done = (stored.where(F.col("model_id") == model_id)
            .select(F.col(key), F.col("text_hash"), F.lit(True).alias("_stored")))
    joined = current.join(done, [key, "text_hash"], "left")
    status = (F.when(is_empty_text("text"), F.lit(EMPTY))
              .when(F.col("_stored"), F.lit(UNCHANGED))
              .otherwise(F.lit(EMBED)))
    return joined.withColumn("status", status).drop("_stored")


def distinct_texts(rows: DataFrame, partitions: int) -> DataFrame:
    """One row per text_hash (text_hash, text), hash-partitioned into ``partitions``.

    The repartition comes last, on the aggregate's output, so adaptive execution keeps its partition
    count. Before the groupBy it merges into the shuffle of a join under it (the train stage's
    anti-join against stored vectors), which adaptive execution may coalesce into one task: the
    CPU-bound embedding then runs on one core.
    """
    return rows.groupBy("text_hash").agg(F.first("text").alias("text")).repartition(partitions, "text_hash")


def embed_texts(texts: DataFrame, spec: EncoderSpec) -> DataFrame:
    """(text_hash, text) -> (text_hash, embedding): tokenize and forward pass in one Python step (CPU)."""
    require_columns(texts, ("text_hash", "text"), "embed_texts")
    return texts.select("text_hash", "text").mapInArrow(_encode_texts_fn(spec), VECTORS_SCHEMA)


def tokenize_texts(texts: DataFrame, model: str) -> DataFrame:
    """(text_hash, text) -> (text_hash, token_ids array<int>), truncated to the model's length."""
    require_columns(texts, ("text_hash", "text"), "tokenize_texts")
    return texts.select("text_hash", "text").mapInArrow(_tokenize_fn(model), TOKENS_SCHEMA)


def embed_token_ids(tokens: DataFrame, spec: EncoderSpec, profile: "ResourceProfile | None" = None) -> DataFrame:
    """(text_hash, token_ids) -> (text_hash, embedding): the forward pass only, under ``profile``."""
    require_columns(tokens, ("text_hash", "token_ids"), "embed_token_ids")
    return tokens.select("text_hash", "token_ids").mapInArrow(_encode_ids_fn(spec), VECTORS_SCHEMA, profile=profile)


# --------------------------------------------------------------------------
# GPU checks
# --------------------------------------------------------------------------
def check_gpu_conf(conf: Mapping[str, str], master: str, why: str = "embed.device is cuda") -> float | None:
    """The GPUs per task that ``embed.device=cuda`` will ask for; None on a local master.

    Raises ConfigError naming the Spark key when a cluster master lacks the GPU
    settings. Local masters have no executors and no stage-level scheduling: the
    worker finds its GPU through CUDA_VISIBLE_DEVICES (or fails naming the key).
    """
    if master.startswith("local"):
        return None
    for key in (EXECUTOR_GPU_KEY, GPU_KEY):
        value = conf.get(key)
        try:
            amount = float(value) if value is not None else 0.0
        except ValueError:
            raise ConfigError(f"spark.conf: {key}: not a number (got {value!r})") from None
        if amount <= 0:
            raise ConfigError(f"{why} but {key} is {value or 'not set'}: set it in spark.conf "
                              "(or the launcher) to give executors and tasks a GPU")
    return float(conf[GPU_KEY])


def gpu_profile(gpus_per_task: float, cpus_per_task: int) -> "ResourceProfile":
    """A stage-level profile for the forward pass: ``gpus_per_task`` GPU and ``cpus_per_task`` cores per task."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    requests = TaskResourceRequests().cpus(cpus_per_task).resource("gpu", gpus_per_task)
    return ResourceProfileBuilder().require(requests).build


def spark_conf(spark: "SparkSession") -> tuple[str, dict[str, str]]:
    """(master, launch-time Spark conf): where the GPU keys live."""
    return spark.sparkContext.master, dict(spark.sparkContext.getConf().getAll())


# --------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedCounts:
    rows: int = 0
    embedded: int = 0      # rows written with a new embedding
    texts_embedded: int = 0  # distinct texts run through the model
    unchanged: int = 0     # skipped: (key, text_hash, model_id) already stored
    empty: int = 0         # skipped: null or blank text


@dataclass(frozen=True)
class EmbedResult:
    as_of_date: dt.date
    model_id: str
    users: EmbedCounts
    items: EmbedCounts


class Embedder:
    """The embedding step for one run: CPU fused, or tokenize (CPU) -> forward pass (GPU profile)."""

    def __init__(self, spark: "SparkSession", settings: Settings) -> None:
        self.spark = spark
        self.embed = settings.embed
        self.spec = EncoderSpec.from_settings(settings.embed)
        self.profile: ResourceProfile | None = None
        self.gpu = settings.embed.device == "cuda"
        if self.gpu:
            master, conf = spark_conf(spark)
            gpus = check_gpu_conf(conf, master)
            if gpus is not None:
                self.profile = gpu_profile(gpus, settings.embed.gpu_task_cpus)

    def partitions(self, n_texts: int) -> int:
        return max(self.spark.sparkContext.defaultParallelism, math.ceil(n_texts / TEXTS_PER_PARTITION))

    def __call__(self, texts: DataFrame) -> DataFrame:
        if not self.gpu:
            return embed_texts(texts, self.spec)
        tokens = tokenize_texts(texts, self.spec.model)
        if self.embed.gpu_partitions:
            tokens = tokens.repartition(self.embed.gpu_partitions)
        else:  # a stage boundary: tokenizing keeps every core, the forward pass only GPU slots
            tokens = tokens.repartition(self.spark.sparkContext.defaultParallelism)
        return embed_token_ids(tokens, self.spec, self.profile)


def _embed_changes(tables: Tables, embedder: Embedder, current: DataFrame, stored: DataFrame, key: str,
                   model_id: str, table: str, output: Callable[[DataFrame], DataFrame]) -> EmbedCounts:
    """Tag, embed the distinct changed texts, join back and MERGE into ``table``."""
    tagged = tag_changes(current, stored, key, model_id).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {r["status"]: r["n"] for r in tagged.groupBy("status").agg(F.count(F.lit(1)).alias("n")).collect()}
        rows, to_embed = sum(counts.values()), counts.get(EMBED, 0)
        if to_embed == 0:
            return EmbedCounts(rows, 0, 0, counts.get(UNCHANGED, 0), counts.get(EMPTY, 0))
        changed = tagged.where(F.col("status") == EMBED)
        vectors = embedder(distinct_texts(changed, embedder.partitions(to_embed)))
        vectors = vectors.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            texts_embedded = vectors.count()  # runs the model once; the MERGE reads the cached vectors
            joined = changed.join(vectors, "text_hash").withColumn("model_id", F.lit(model_id))
            written = tables.merge(table, output(joined))
        finally:
            vectors.unpersist()
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
        users = _embed_changes(
            tables, embedder, texts.select("user_key", "as_of_date", "text", "text_hash"),
            tables.read("user_embeddings"), "user_key", model_id, "user_embeddings",
            lambda df: df.select("user_key", "as_of_date", "text_hash", "model_id", "embedding"))
        if users.rows == 0:
            raise UserlensError(f"no user_texts for {as_of}: run `userlens textualize --date {as_of}` first")
        items = EmbedCounts()
        if settings.embed.items and tables.exists("items"):
            items = _embed_changes(
                tables, embedder, item_texts(tables.read("items"), settings.embed.item_text_fields),
                tables.read("item_embeddings"), "item_id", model_id, "item_embeddings",
                lambda df: df.select("item_id", "model_id", "text_hash", "embedding"))
    finally:
        if previous_batch is None:
            spark.conf.unset(ARROW_BATCH_KEY)
        else:
            spark.conf.set(ARROW_BATCH_KEY, previous_batch)

    run.rows_in, run.rows_out = users.rows, users.embedded
    run.details.update({
        "model_id": model_id, "device": settings.embed.device,
        "users_embedded": users.embedded, "user_texts_embedded": users.texts_embedded,
        "users_unchanged": users.unchanged, "users_empty": users.empty,
        "items_in": items.rows, "items_embedded": items.embedded, "item_texts_embedded": items.texts_embedded,
        "items_unchanged": items.unchanged, "items_empty": items.empty,
    })
    log.info("embed: %d user rows: %d embedded (%d distinct texts), %d unchanged, %d empty; items: %d embedded, "
             "%d unchanged, %d empty", users.rows, users.embedded, users.texts_embedded, users.unchanged, users.empty,
             items.embedded, items.unchanged, items.empty)
    return EmbedResult(as_of, model_id, users, items)
