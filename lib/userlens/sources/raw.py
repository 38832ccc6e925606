"""The raw-record contract, the readers that produce it, and the classification of raw rows
(pure Spark transforms; all validation, pseudonymizing and PII scrubbing are native expressions).

Any source (json / csv / parquet / delta through ``source.mapping``, or a dataset adapter of
:mod:`userlens.sources.datasets`) becomes rows of the raw contract: ``raw`` (the record as JSON
text), ``source_date``, ``corrupt`` and one string column ``f_<field>`` per canonical field.
:func:`classify_events` / :func:`classify_items` then give every row a status: ``ok``,
``quarantined`` (with a reason) or ``duplicate``; the ingest stage writes them, ``userlens
evaluate`` and ``check-source`` read them without writing.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.config import IngestSettings, Settings, SourceSettings
from userlens.errors import SourceError, first_line
from userlens.privacy import PseudonymKey, pseudonymize, scrub_pii
from userlens.sources.redact import redact_raw_record

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

OK, QUARANTINED, DUPLICATE = "ok", "quarantined", "duplicate"


EVENT_FIELDS = (
    "event_id",
    "user_id",
    "event_time",
    "event_type",
    "item_id",
    "category",
    "price",
    "quantity",
    "query",
    "text",
)


ITEM_FIELDS = ("item_id", "title", "category", "brand", "price", "description")


CORRUPT = "_corrupt_record"


# --------------------------------------------------------------------------
# reading: any format -> (raw, source_date, corrupt, f_<canonical> strings)
# --------------------------------------------------------------------------
def read_raw(
    spark: "SparkSession",
    path: str,
    fmt: str,
    mapping: Mapping[str, str | None],
    source: SourceSettings,
    exclude: Sequence[str] = (),
) -> DataFrame:
    """Read a raw source into canonical string columns ``f_<field>``.

    Output columns: ``raw`` (the original record as text), ``source_date`` (the
    date partition of the raw layout, or null), ``corrupt`` (record could not be
    parsed), and one string column ``f_<field>`` per canonical field (null when
    unmapped or absent). ``exclude``: files left out (``ingest.on_unreadable_file: skip``).
    """
    target: str | list[str] = path
    if exclude:
        if fmt == "delta":
            raise SourceError(f"cannot skip {exclude[0]}: a Delta source is read as one table")
        skipped = {_file_path(f) for f in exclude}
        target = [f for f in list_data_files(spark, path) if _file_path(f) not in skipped]
        if not target:
            raise SourceError(f"no readable file left in {path} after skipping {len(skipped)} unreadable one(s)")
    try:
        reader = spark.read.option("basePath", path) if exclude else spark.read
        if fmt == "json":
            df = reader.text(target)
        elif fmt == "csv":
            df = (
                reader.option("header", str(source.csv_header).lower())
                .option("mode", "PERMISSIVE")
                .option("inferSchema", "false")
                .csv(target)
            )
        else:
            df = reader.format(fmt).load(target)
    except Exception as exc:  # noqa: BLE001 - surfaced as one line
        raise SourceError(f"cannot read {fmt} source at {path}: {first_line(exc)}") from exc

    part = source.date_partition
    has_part = part in df.columns
    part_col = F.col(part).cast("string").try_cast(T.DateType()) if has_part else F.lit(None).cast(T.DateType())
    if fmt == "json":
        names = sorted({c for c in mapping.values() if c})
        schema = T.StructType(
            [T.StructField(n, T.StringType()) for n in names] + [T.StructField(CORRUPT, T.StringType())]
        )
        parsed = F.from_json("value", schema, {"columnNameOfCorruptRecord": CORRUPT, "mode": "PERMISSIVE"})
        df = df.select(F.col("value").alias("raw"), part_col.alias("source_date"), parsed.alias("j"))
        out = [
            F.col("raw"),
            F.col("source_date"),
            (F.col(f"j.{CORRUPT}").isNotNull() | F.col("j").isNull()).alias("corrupt"),
        ]
        for field, column in mapping.items():
            value = F.col(f"j.`{column}`") if column else F.lit(None).cast("string")
            out.append(value.alias(f"f_{field}"))
        return df.select(out)

    data_cols = [c for c in df.columns if c not in (part, CORRUPT)]
    corrupt = F.col(CORRUPT).isNotNull() if CORRUPT in df.columns else F.lit(False)
    out = [
        F.to_json(F.struct(*[F.col(f"`{c}`") for c in data_cols])).alias("raw"),
        part_col.alias("source_date"),
        corrupt.alias("corrupt"),
    ]
    for field, column in mapping.items():
        if column and column in df.columns:
            out.append(F.col(f"`{column}`").cast("string").alias(f"f_{field}"))
        else:
            out.append(F.lit(None).cast("string").alias(f"f_{field}"))
    return df.select(out)


# --------------------------------------------------------------------------
# column helpers
# --------------------------------------------------------------------------
def parse_event_time(raw: Column, timestamp_format: str | None) -> Column:
    """Parse a raw time string to a timestamp; unparseable -> null (never an error)."""
    if timestamp_format in ("epoch_s", "epoch_ms"):
        seconds = raw.try_cast(T.DoubleType())
        if timestamp_format == "epoch_ms":
            seconds = seconds / 1000.0
        return F.when(seconds.isNotNull(), F.timestamp_seconds(seconds))
    if timestamp_format:
        return F.try_to_timestamp(raw, F.lit(timestamp_format))
    return F.try_to_timestamp(raw)


def blank_to_null(column: Column) -> Column:
    """The trimmed text, or null when nothing is left."""
    trimmed = F.trim(column)
    return F.when(F.length(trimmed) > 0, trimmed)


def _file_path(location: str) -> str:
    """A file's path without its ``file:`` scheme (Spark writes file:///x, Hadoop lists file:/x)."""
    return re.sub(r"^file:/*", "/", location)


def list_data_files(spark: "SparkSession", path: str) -> list[str]:
    """Every data file under ``path`` as Spark reads them (names starting with ``.`` or ``_`` skipped)."""
    jvm = spark.sparkContext._jvm
    assert jvm is not None  # set once the context has started
    root = jvm.org.apache.hadoop.fs.Path(path)
    fs = root.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    files, listing = [], fs.listFiles(root, True)
    while listing.hasNext():
        file_path = listing.next().getPath()
        relative = str(file_path.toUri().getPath())[len(str(root.toUri().getPath())) :]
        if not any(part.startswith((".", "_")) for part in relative.split("/") if part):
            files.append(str(file_path))
    return sorted(files)


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------
def classify_rows(raw: DataFrame, settings: Settings, key: PseudonymKey) -> DataFrame:
    """Typed, validated, pseudonymized, scrubbed events with a ``reason`` per row (null: valid), before
    duplicates are marked (:func:`mark_duplicates`). A narrow transform: no shuffle.

    Besides the event columns it carries what duplicate marking needs: a 128-bit hash ``dup_h1``/``dup_h2``
    of what makes two rows copies (a valid event's ``user_key`` and ``event_id``; a quarantined row's raw
    text) and ``raw_order`` (a hash of the raw text, which decides the copy kept). Only a quarantined row keeps
    its raw text (the quarantine table stores it, redacted): a valid row's would be carried for nothing.
    """
    ingest: IngestSettings = settings.ingest
    source = settings.source
    type_map = {k.lower(): v for k, v in source.event_type_map.items()}

    event_type = F.lower(blank_to_null(F.col("f_event_type")))
    if type_map:
        mapped = F.create_map(*[F.lit(x) for kv in type_map.items() for x in kv])
        event_type = F.coalesce(F.element_at(mapped, event_type), event_type)
    price_raw = blank_to_null(F.col("f_price"))
    quantity_raw = blank_to_null(F.col("f_quantity"))
    df = raw.select(
        "raw",
        "source_date",
        "corrupt",
        blank_to_null(F.col("f_user_id")).alias("user_id"),
        parse_event_time(blank_to_null(F.col("f_event_time")), source.timestamp_format).alias("event_time"),
        event_type.alias("event_type"),
        blank_to_null(F.col("f_item_id")).alias("item_id"),
        blank_to_null(F.col("f_category")).alias("category"),
        price_raw.alias("price_raw"),
        price_raw.try_cast(T.DoubleType()).alias("price"),
        quantity_raw.alias("quantity_raw"),
        quantity_raw.try_cast(T.IntegerType()).alias("quantity"),
        blank_to_null(F.col("f_query")).alias("query"),
        blank_to_null(F.col("f_text")).alias("text"),
        F.coalesce(blank_to_null(F.col("f_event_id")), F.sha2(F.col("raw"), 256)).alias("event_id"),
    )
    reason = (
        F.when(F.col("corrupt"), "malformed_record")
        .when(F.col("user_id").isNull(), "missing_user_id")
        .when(F.col("event_time").isNull(), "bad_timestamp")
        .when(F.col("event_type").isNull(), "missing_event_type")
        .when(~F.col("event_type").isin(*ingest.event_types), "unknown_event_type")
        .when(F.col("event_type").isin(*ingest.item_event_types) & F.col("item_id").isNull(), "missing_item_id")
        .when(F.col("price_raw").isNotNull() & (F.col("price").isNull() | F.isnan("price")), "bad_price")
        .when(F.col("price") < 0, "negative_price")
        .when(
            F.col("quantity_raw").isNotNull()
            & (F.col("quantity").isNull() | (F.col("quantity") <= 0) | (F.col("quantity") > ingest.max_quantity)),
            "bad_quantity",
        )
    )
    df = df.withColumn("reason", reason).withColumn("user_key", pseudonymize(F.col("user_id"), key))
    # Exact duplicates share the raw text; a valid event repeated with other formatting shares
    # (user_key, event_id).
    bad = F.col("reason").isNotNull()
    df = df.select(
        F.when(bad, F.col("raw")).alias("raw"),
        F.xxhash64("raw").alias("raw_order"),
        _dup_key(bad, F.col("raw")).alias("dup_key"),
        *[c for c in df.columns if c != "raw"],
    )
    event_date = F.coalesce(F.col("source_date"), F.to_date("event_time"))
    return df.select(
        "raw",
        "source_date",
        "reason",
        "user_key",
        "event_id",
        "event_time",
        event_date.alias("event_date"),
        "event_type",
        "item_id",
        "category",
        "price",
        "quantity",
        scrub_pii(F.col("query")).alias("query"),
        scrub_pii(F.col("text")).alias("text"),
        F.xxhash64("dup_key").alias("dup_h1"),
        F.xxhash64(F.lit("userlens"), "dup_key").alias("dup_h2"),
        "raw_order",
    )


DUP_COLUMNS = ("dup_h1", "dup_h2", "raw_order")


def _dup_key(bad: Column, raw: Column) -> Column:
    """What makes two rows copies of one another: a valid event's (user_key, event_id), a quarantined
    row's raw text (kept only for quarantined rows, so after classify_rows ``raw`` can be passed)."""
    return F.when(~bad, F.concat_ws("\u0001", "user_key", "event_id")).otherwise(raw)


def duplicate_keys(rows: DataFrame) -> DataFrame:
    """(dup_h1, dup_h2, source_date) of the duplicate groups among :func:`classify_rows`' rows: a hash
    aggregate over three fixed-width columns, so the rows themselves are not shuffled. Duplicates are
    rare, so this is small; a hash collision only puts a group through :func:`mark_duplicates`' exact
    check."""
    keys = ["dup_h1", "dup_h2", "source_date"]
    return rows.groupBy(*keys).agg(F.count(F.lit(1)).alias("n")).where(F.col("n") > 1).select(*keys)


def mark_duplicates(rows: DataFrame, dup_keys: DataFrame | None = None) -> DataFrame:
    """``status`` per row of :func:`classify_rows`: ``duplicate`` for every copy of an event (or of a
    quarantined raw text) but the one with the smallest ``raw_order`` in its source date, else
    ``quarantined`` (with a reason) or ``ok``.

    Only the rows of a duplicate group (``dup_keys``, default :func:`duplicate_keys`) go through the
    window that ranks the copies; the others keep their order and partitioning: at 10^7 events the
    window over every row cost more than the rest of ingest together."""
    groups = (duplicate_keys(rows) if dup_keys is None else dup_keys).select(
        F.col("dup_h1").alias("g_h1"), F.col("dup_h2").alias("g_h2"), F.col("source_date").alias("g_date")
    )
    # null-safe on the date: a source without date folders has none, and its duplicates count too
    match = (
        (F.col("dup_h1") == F.col("g_h1"))
        & (F.col("dup_h2") == F.col("g_h2"))
        & F.col("source_date").eqNullSafe(F.col("g_date"))
    )
    flagged = rows.join(groups.withColumn("in_group", F.lit(True)), match, "left")
    single = flagged.where(F.col("in_group").isNull()).withColumn("rank", F.lit(1))
    dup_key = _dup_key(F.col("reason").isNotNull(), F.col("raw"))
    copies = flagged.where(F.col("in_group")).withColumn(
        "rank", F.row_number().over(Window.partitionBy(dup_key, "source_date").orderBy("raw_order", "raw"))
    )
    status = F.when(F.col("rank") > 1, DUPLICATE).when(F.col("reason").isNotNull(), QUARANTINED).otherwise(OK)
    columns = [c for c in rows.columns if c not in DUP_COLUMNS]
    return single.unionByName(copies).select(*columns, status.alias("status"))


def classify_events(raw: DataFrame, settings: Settings, key: PseudonymKey) -> DataFrame:
    """Typed, validated, pseudonymized, scrubbed events with a ``status`` and ``reason`` per row.

    ``status`` is ok, quarantined or duplicate; exact duplicates (same raw text)
    and repeated (user_key, event_id) pairs keep one row, chosen deterministically.
    ``raw`` is kept for quarantined rows only.
    """
    return mark_duplicates(classify_rows(raw, settings, key))


def quarantine_rows(
    classified: DataFrame, source_name: str, roles: dict[str, str], key: PseudonymKey, run_id: str, now: dt.datetime
) -> DataFrame:
    """Quarantined rows as ``events_quarantine`` rows; the raw text keeps no value that could identify a
    person, whatever the mapping (:mod:`userlens.sources.redact`)."""
    return classified.where(F.col("status") == QUARANTINED).select(
        redact_raw_record(F.col("raw"), roles, key).alias("raw"),
        "reason",
        F.lit(source_name).alias("source"),
        F.lit(run_id).alias("run_id"),
        "source_date",
        "user_key",
        F.lit(now).cast(T.TimestampType()).alias("quarantined_at"),
    )


def classify_items(raw: DataFrame) -> DataFrame:
    """Typed, scrubbed catalog rows with ``status``/``reason``; one row kept per item_id."""
    price_raw = blank_to_null(F.col("f_price"))
    df = raw.select(
        "raw",
        "source_date",
        "corrupt",
        blank_to_null(F.col("f_item_id")).alias("item_id"),
        scrub_pii(F.col("f_title")).alias("title"),
        blank_to_null(F.col("f_category")).alias("category"),
        blank_to_null(F.col("f_brand")).alias("brand"),
        price_raw.alias("price_raw"),
        price_raw.try_cast(T.DoubleType()).alias("price"),
        scrub_pii(F.col("f_description")).alias("description"),
    )
    reason = (
        F.when(F.col("corrupt"), "malformed_record")
        .when(F.col("item_id").isNull(), "missing_item_id")
        .when(F.col("price_raw").isNotNull() & (F.col("price").isNull() | F.isnan("price")), "bad_price")
        .when(F.col("price") < 0, "negative_price")
    )
    df = df.withColumn("reason", reason).withColumn("user_key", F.lit(None).cast("string"))
    dup_key = F.when(F.col("reason").isNull(), F.col("item_id")).otherwise(F.col("raw"))
    rank = F.row_number().over(Window.partitionBy(dup_key).orderBy("raw"))
    return df.withColumn(
        "status", F.when(rank > 1, DUPLICATE).when(F.col("reason").isNotNull(), QUARANTINED).otherwise(OK)
    )
