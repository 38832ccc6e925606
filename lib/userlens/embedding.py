"""Embedding texts with the encoder inside Spark: the encoder spec, the worker functions, the GPU checks,
and :func:`vectors_for`, which the embed and train stages share ("reuse the stored vectors, embed the rest").

The model runs in ``mapInArrow``. Measured on 2 shared cores with MiniLM
(bench/embed.py, docs/benchmarks.md), the model step alone ran 9-11% faster as an
iterator pandas UDF (two runs, noisy machine; not yet explained). ``mapInArrow``
is kept for now because it returns the embeddings as one Arrow list column built
from a flat float32 buffer with no per-row Python object, which the GPU design
needs once the model is fast; re-measure on a quiet machine before settling.
The encoder is loaded once per Python worker
(:func:`userlens.models.encoder.cached_encoder`) and Spark reuses the worker
across tasks; nothing is loaded on the driver, and embeddings never reach it.

One ``mapInArrow`` step per task tokenizes and runs the model, on CPU and on GPU:
a pool of tokenizer threads (``embed.gpu_task_cpus`` on a GPU, one on CPU)
tokenizes and pads (pins, on a GPU) the next ``embed.prefetch_batches`` Arrow
batches while the model runs on the current one,
so the device waits for the tokenizer only when the tokenizer is the slower of
the two (Hugging Face's fast tokenizers release the GIL). Within an Arrow batch
the texts are sorted by length and cut into token-budgeted micro-batches, so
padding is a few percent of the tokens. On GPU (``embed.device=cuda``) the step
runs under a stage-level ``ResourceProfile`` (one GPU and
``embed.gpu_task_cpus`` cores per task), so no CPU stage holds a GPU. (An
earlier design tokenized in a CPU stage of its own and shuffled the token ids to
a forward-pass stage: the stage boundary left the GPU idle while every text was
tokenized.) Each task's :class:`userlens.models.encoder.EncodeStats` (tokens,
padding, seconds in the model) are summed by an accumulator into the run's
``pipeline_runs.details``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark import StorageLevel
from pyspark.accumulators import AccumulatorParam
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.config import EmbedSettings, Settings
from userlens.errors import ConfigError, require_columns
from userlens.models.encoder import GPU_KEY, Encoder, EncodeStats, cached_encoder, describe_model
from userlens.tables import VECTOR

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.accumulators import Accumulator
    from pyspark.resource import ResourceProfile
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


EXECUTOR_GPU_KEY = "spark.executor.resource.gpu.amount"


ARROW_BATCH_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"


# the table's vector type: float elements, never null (a cast cannot add that guarantee later)
VECTORS_SCHEMA = T.StructType([T.StructField("text_hash", T.StringType()), T.StructField("embedding", VECTOR)])


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


def _encode_texts_fn(
    spec: EncoderSpec, prefetch: int, threads: int, stats: "Accumulator[EncodeStats] | None" = None
) -> Callable[[Iterable["pa.RecordBatch"]], Iterator["pa.RecordBatch"]]:
    def encode_partition(batches: Iterable["pa.RecordBatch"]) -> Iterator["pa.RecordBatch"]:
        texts = ((b.column("text_hash"), b.column("text").to_pylist()) for b in batches if b.num_rows)
        first = next(texts, None)
        if first is None:  # an empty partition loads no model
            return
        encoder = spec.load()
        counted = EncodeStats()
        stream = itertools.chain([first], texts)
        for text_hash, vectors in encoder.encode_stream(stream, prefetch=prefetch, threads=threads, stats=counted):
            yield _vectors_batch(text_hash, vectors)
        if stats is not None:
            stats.add(counted)

    return encode_partition


class _StatsParam(AccumulatorParam):
    """Sums the :class:`EncodeStats` of the tasks (a Spark accumulator: read on the driver)."""

    def zero(self, value: EncodeStats) -> EncodeStats:
        return EncodeStats()

    def addInPlace(self, value1: EncodeStats, value2: EncodeStats) -> EncodeStats:  # noqa: N802 - pyspark's name
        return value1.add(value2)


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------
def is_empty_text(text: str) -> "F.Column":
    """True for a null or blank text (nothing for the model to read)."""
    return F.col(text).isNull() | (F.length(F.trim(F.col(text))) == 0)


def item_texts(items: DataFrame, fields: Sequence[str]) -> DataFrame:
    """item_id, text (the non-blank fields joined by '. '), text_hash."""
    require_columns(items, ("item_id", *fields), "item_texts")
    parts = [F.when(F.length(F.trim(F.col(f))) > 0, F.trim(F.col(f))) for f in fields]
    text = F.concat_ws(". ", *parts)
    return items.select("item_id", text.alias("text")).withColumn("text_hash", F.sha2(F.col("text"), 256))


def distinct_texts(rows: DataFrame, partitions: int) -> DataFrame:
    """One row per text_hash (text_hash, text), hash-partitioned into ``partitions``.

    The repartition comes last, on the aggregate's output, so adaptive execution keeps its partition
    count. Before the groupBy it merges into the shuffle of a join under it (the train stage's
    anti-join against stored vectors), which adaptive execution may coalesce into one task: the
    CPU-bound embedding then runs on one core.
    """
    return rows.groupBy("text_hash").agg(F.first("text").alias("text")).repartition(partitions, "text_hash")


def embed_texts(
    texts: DataFrame,
    spec: EncoderSpec,
    profile: "ResourceProfile | None" = None,
    prefetch: int = 4,
    stats: "Accumulator[EncodeStats] | None" = None,
    threads: int = 1,
) -> DataFrame:
    """(text_hash, text) -> (text_hash, embedding). One Python step per task: ``threads`` tokenizer threads
    tokenize and pad the next ``prefetch`` Arrow batches while the model runs on the current one
    (:meth:`userlens.models.encoder.Encoder.encode_stream`); ``profile`` (GPU) is the stage's resource
    profile; ``stats`` sums what every task's encoder did."""
    require_columns(texts, ("text_hash", "text"), "embed_texts")
    return texts.select("text_hash", "text").mapInArrow(
        _encode_texts_fn(spec, prefetch, threads, stats), VECTORS_SCHEMA, profile=profile
    )


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
            raise ConfigError(
                f"{why} but {key} is {value or 'not set'}: set it in spark.conf "
                "(or the launcher) to give executors and tasks a GPU"
            )
    return float(conf[GPU_KEY])


def gpu_profile(gpus_per_task: float, cpus_per_task: int) -> "ResourceProfile":
    """A stage-level profile for the forward pass: ``gpus_per_task`` GPU and ``cpus_per_task`` cores per task."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    requests = TaskResourceRequests().cpus(cpus_per_task).resource("gpu", gpus_per_task)
    return ResourceProfileBuilder().require(requests).build


def spark_conf(spark: "SparkSession") -> tuple[str, dict[str, str]]:
    """(master, launch-time Spark conf): where the GPU keys live."""
    master = spark.sparkContext.master
    assert master is not None  # set once the context has started
    return master, dict(spark.sparkContext.getConf().getAll())


class Embedder:
    """The embedding step for one run (:func:`embed_texts`; on GPU under the stage's resource profile)."""

    def __init__(self, spark: "SparkSession", settings: Settings) -> None:
        self.spark = spark
        self.embed = settings.embed
        self.spec = EncoderSpec.from_settings(settings.embed)
        self.profile: ResourceProfile | None = None
        self.gpu = settings.embed.device == "cuda"
        # what the encoders of this run did, summed over the tasks (EncodeStats.summary: pipeline_runs.details)
        self.stats = spark.sparkContext.accumulator(EncodeStats(), _StatsParam())
        if self.gpu:
            master, conf = spark_conf(spark)
            gpus = check_gpu_conf(conf, master)
            if gpus is not None:
                self.profile = gpu_profile(gpus, settings.embed.gpu_task_cpus)

    def partitions(self, n_texts: int) -> int:
        if self.gpu and self.embed.gpu_partitions:
            return self.embed.gpu_partitions
        return max(self.spark.sparkContext.defaultParallelism, math.ceil(n_texts / TEXTS_PER_PARTITION))

    def __call__(self, texts: DataFrame) -> DataFrame:
        # on a GPU the task's cores tokenize (its model runs on the GPU); on CPU torch has the cores
        threads = self.embed.gpu_task_cpus if self.gpu else 1
        return embed_texts(texts, self.spec, self.profile, self.embed.prefetch_batches, self.stats, threads)


@dataclass
class Vectors:
    """(text_hash, embedding) of every text asked for; ``fresh`` holds the newly embedded ones, persisted."""

    frame: DataFrame
    fresh: DataFrame | None
    embedded: int  # distinct texts the encoder ran on

    def release(self) -> None:
        if self.fresh is not None:
            self.fresh.unpersist()


def vectors_for(embedder: "Embedder", texts: DataFrame, stored: DataFrame | None, model_id: str) -> Vectors:
    """The vectors of ``texts`` (text_hash, text): those in ``stored`` (rows with text_hash, model_id,
    embedding: ``user_embeddings``, ``item_embeddings``) for ``model_id`` are reused, the rest embedded
    now. The encoder has run when this returns (the new vectors are persisted and counted, so a caller
    can time it); call :meth:`Vectors.release` when done."""
    wanted = texts.select("text_hash", "text").dropDuplicates(["text_hash"])
    reused = None
    if stored is not None:
        reused = (
            stored.where(F.col("model_id") == model_id)
            .select("text_hash", "embedding")
            .dropDuplicates(["text_hash"])
            .join(wanted.select("text_hash"), "text_hash")
        )
    missing = wanted if reused is None else wanted.join(reused.select("text_hash"), "text_hash", "left_anti")
    n_missing = missing.count()
    if n_missing == 0:
        assert reused is not None
        return Vectors(reused, None, 0)
    fresh = embedder(distinct_texts(missing, embedder.partitions(n_missing))).persist(StorageLevel.MEMORY_AND_DISK)
    fresh.count()  # runs the model once; what reads the vectors reads the cached ones
    return Vectors(fresh if reused is None else fresh.unionByName(reused), fresh, n_missing)


def user_vectors(
    embedder: "Embedder", rows: DataFrame, stored: DataFrame | None, model_id: str, state: bool
) -> Vectors:
    """:func:`vectors_for` over users' history texts (text_hash, text) and, with ``state``, their state
    texts (state_hash, state_text) in one encoder pass; ``stored`` (``user_embeddings``) lends both its
    vectors. The frame is keyed by either hash: join it back with :func:`with_user_vectors`."""
    texts = rows.select("text_hash", "text")
    if state:
        texts = texts.unionByName(
            rows.where(F.col("state_hash").isNotNull()).select(
                F.col("state_hash").alias("text_hash"), F.col("state_text").alias("text")
            )
        )
    lent = None
    if stored is not None:
        lent = stored.select("text_hash", "model_id", "embedding")
        if state and "state_embedding" in stored.columns:
            lent = lent.unionByName(
                stored.where(F.col("state_embedding").isNotNull()).select(
                    F.col("state_hash").alias("text_hash"), "model_id", F.col("state_embedding").alias("embedding")
                )
            )
    return vectors_for(embedder, texts, lent, model_id)


def with_user_vectors(rows: DataFrame, vectors: DataFrame, state: bool) -> DataFrame:
    """``rows`` with ``embedding`` (of text_hash) and, with ``state``, ``state_embedding`` (of state_hash;
    null where a row has no state text)."""
    out = rows.join(vectors, "text_hash")
    if state:
        by_state = vectors.select(F.col("text_hash").alias("state_hash"), F.col("embedding").alias("state_embedding"))
        out = out.join(by_state, "state_hash", "left")
    return out
