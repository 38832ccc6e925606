"""Ingest: raw logs -> ``events`` (+ ``events_quarantine``) and ``items``.

Pure transforms first (DataFrame in, DataFrame out), the runner last. All
validation, pseudonymizing and PII scrubbing are native Spark expressions.

Every raw row ends up in exactly one place: ``events`` (status ``ok``),
``events_quarantine`` (with its raw text, scrubbed, and a reason) or counted as a
duplicate. The runner checks rows_in = rows_out + rows_quarantined + duplicates
against the row counts Delta reports for the writes.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.config import IngestSettings, Settings, SourceSettings
from userlens.errors import SourceError, UserlensError, first_line
from userlens.privacy import PseudonymKey, pseudonymize, record_key_id, require_same_key, scrub_pii
from userlens.runs import StageRun
from userlens.tables import Tables, same_rows

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

EVENT_FIELDS = ("event_id", "user_id", "event_time", "event_type", "item_id", "category",
                "price", "quantity", "query", "text")
ITEM_FIELDS = ("item_id", "title", "category", "brand", "price", "description")
CORRUPT = "_corrupt_record"

OK, QUARANTINED, DUPLICATE = "ok", "quarantined", "duplicate"


# --------------------------------------------------------------------------
# reading: any format -> (raw, source_date, corrupt, f_<canonical> strings)
# --------------------------------------------------------------------------
def read_raw(spark: "SparkSession", path: str, fmt: str, mapping: dict[str, str | None],
             source: SourceSettings) -> DataFrame:
    """Read a raw source into canonical string columns ``f_<field>``.

    Output columns: ``raw`` (the original record as text), ``source_date`` (the
    date partition of the raw layout, or null), ``corrupt`` (record could not be
    parsed), and one string column ``f_<field>`` per canonical field (null when
    unmapped or absent).
    """
    try:
        if fmt == "json":
            df = spark.read.text(path)
        elif fmt == "csv":
            df = (spark.read.option("header", str(source.csv_header).lower()).option("mode", "PERMISSIVE")
                  .option("inferSchema", "false").csv(path))
        else:
            df = spark.read.format(fmt).load(path)
    except Exception as exc:  # noqa: BLE001 - surfaced as one line
        raise SourceError(f"cannot read {fmt} source at {path}: {first_line(exc)}") from None

    part = source.date_partition
    has_part = part in df.columns
    part_col = F.col(part).cast("string").try_cast(T.DateType()) if has_part else F.lit(None).cast(T.DateType())
    if fmt == "json":
        names = sorted({c for c in mapping.values() if c})
        schema = T.StructType([T.StructField(n, T.StringType()) for n in names]
                              + [T.StructField(CORRUPT, T.StringType())])
        parsed = F.from_json("value", schema, {"columnNameOfCorruptRecord": CORRUPT, "mode": "PERMISSIVE"})
        df = df.select(F.col("value").alias("raw"), part_col.alias("source_date"), parsed.alias("j"))
        out = [F.col("raw"), F.col("source_date"),
               (F.col(f"j.{CORRUPT}").isNotNull() | F.col("j").isNull()).alias("corrupt")]
        for field, column in mapping.items():
            value = F.col(f"j.`{column}`") if column else F.lit(None).cast("string")
            out.append(value.alias(f"f_{field}"))
        return df.select(out)

    data_cols = [c for c in df.columns if c not in (part, CORRUPT)]
    corrupt = F.col(CORRUPT).isNotNull() if CORRUPT in df.columns else F.lit(False)
    out = [F.to_json(F.struct(*[F.col(f"`{c}`") for c in data_cols])).alias("raw"),
           part_col.alias("source_date"), corrupt.alias("corrupt")]
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


def _blank_to_null(column: Column) -> Column:
    trimmed = F.trim(column)
    return F.when(F.length(trimmed) > 0, trimmed)


def redact_user_field(raw: Column, user_field: str, user_key: Column) -> Column:
    """Replace the value of the user-id field inside raw JSON text with the user_key (or <redacted>)."""
    pattern = r'("' + user_field.replace("\\", "\\\\") + r'"\s*:\s*)("(?:[^"\\]|\\.)*"?|[^,}\s]*)'
    replacement = F.concat(F.lit('$1"'), F.coalesce(user_key, F.lit("<redacted>")), F.lit('"'))
    return F.regexp_replace(raw, F.lit(pattern), replacement)


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------
def classify_events(raw: DataFrame, settings: Settings, key: PseudonymKey) -> DataFrame:
    """Typed, validated, pseudonymized, scrubbed events with a ``status`` and ``reason`` per row.

    ``status`` is ok, quarantined or duplicate; exact duplicates (same raw text)
    and repeated (user_key, event_id) pairs keep one row, chosen deterministically.
    """
    ingest: IngestSettings = settings.ingest
    source = settings.source
    type_map = {k.lower(): v for k, v in source.event_type_map.items()}

    event_type = F.lower(_blank_to_null(F.col("f_event_type")))
    if type_map:
        mapped = F.create_map(*[F.lit(x) for kv in type_map.items() for x in kv])
        event_type = F.coalesce(F.element_at(mapped, event_type), event_type)
    price_raw = _blank_to_null(F.col("f_price"))
    quantity_raw = _blank_to_null(F.col("f_quantity"))
    df = raw.select(
        "raw", "source_date", "corrupt",
        _blank_to_null(F.col("f_user_id")).alias("user_id"),
        parse_event_time(_blank_to_null(F.col("f_event_time")), source.timestamp_format).alias("event_time"),
        event_type.alias("event_type"),
        _blank_to_null(F.col("f_item_id")).alias("item_id"),
        _blank_to_null(F.col("f_category")).alias("category"),
        price_raw.alias("price_raw"), price_raw.try_cast(T.DoubleType()).alias("price"),
        quantity_raw.alias("quantity_raw"), quantity_raw.try_cast(T.IntegerType()).alias("quantity"),
        _blank_to_null(F.col("f_query")).alias("query"),
        _blank_to_null(F.col("f_text")).alias("text"),
        F.coalesce(_blank_to_null(F.col("f_event_id")), F.sha2(F.col("raw"), 256)).alias("event_id"),
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
        .when(F.col("quantity_raw").isNotNull()
              & (F.col("quantity").isNull() | (F.col("quantity") <= 0) | (F.col("quantity") > ingest.max_quantity)),
              "bad_quantity")
    )
    user_key = pseudonymize(F.col("user_id"), key)
    df = df.withColumn("reason", reason).withColumn("user_key", user_key)
    # Exact duplicates share the raw text; a valid event repeated with other
    # formatting shares (user_key, event_id). One window covers both.
    dup_key = F.when(F.col("reason").isNull(), F.concat_ws("\u0001", "user_key", "event_id")).otherwise(F.col("raw"))
    rank = F.row_number().over(Window.partitionBy(dup_key, "source_date").orderBy("raw"))
    event_date = F.coalesce(F.col("source_date"), F.to_date("event_time"))
    return df.select(
        "raw", "source_date", "reason", "user_key", "event_id", "event_time",
        event_date.alias("event_date"), "event_type", "item_id", "category", "price", "quantity",
        scrub_pii(F.col("query")).alias("query"), scrub_pii(F.col("text")).alias("text"),
        F.when(rank > 1, DUPLICATE).when(F.col("reason").isNotNull(), QUARANTINED).otherwise(OK).alias("status"),
    )


def quarantine_rows(classified: DataFrame, source_name: str, user_field: str | None, run_id: str,
                    now: dt.datetime) -> DataFrame:
    """Quarantined rows as ``events_quarantine`` rows: raw text scrubbed, user id replaced by its key."""
    raw = F.col("raw")
    if user_field:
        raw = redact_user_field(raw, user_field, F.col("user_key"))
    return classified.where(F.col("status") == QUARANTINED).select(
        scrub_pii(raw).alias("raw"), "reason", F.lit(source_name).alias("source"), F.lit(run_id).alias("run_id"),
        "source_date", "user_key", F.lit(now).cast(T.TimestampType()).alias("quarantined_at"),
    )


def classify_items(raw: DataFrame) -> DataFrame:
    """Typed, scrubbed catalog rows with ``status``/``reason``; one row kept per item_id."""
    price_raw = _blank_to_null(F.col("f_price"))
    df = raw.select(
        "raw", "source_date", "corrupt",
        _blank_to_null(F.col("f_item_id")).alias("item_id"),
        scrub_pii(F.col("f_title")).alias("title"), _blank_to_null(F.col("f_category")).alias("category"),
        _blank_to_null(F.col("f_brand")).alias("brand"),
        price_raw.alias("price_raw"), price_raw.try_cast(T.DoubleType()).alias("price"),
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
        "status", F.when(rank > 1, DUPLICATE).when(F.col("reason").isNotNull(), QUARANTINED).otherwise(OK))


# --------------------------------------------------------------------------
# dates
# --------------------------------------------------------------------------
def list_partition_dates(spark: "SparkSession", path: str, column: str) -> list[dt.date] | None:
    """Dates of ``column=YYYY-MM-DD`` folders under ``path`` (Hadoop FS: local, HDFS, S3, DBFS).

    None when the layout has no such folders. Raises SourceError if ``path`` is missing.
    """
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if not fs.exists(hpath):
        raise SourceError(f"source.path: {path} does not exist")  # before any write
    prefix = column + "="
    dates = []
    for status in fs.listStatus(hpath):
        name = status.getPath().getName()
        if status.isDirectory() and name.startswith(prefix):
            try:
                dates.append(dt.date.fromisoformat(name[len(prefix):]))
            except ValueError:
                log.warning("ignoring folder %s: not a %s=YYYY-MM-DD partition", name, column)
    return sorted(dates) or None


def dates_to_ingest(raw_dates: list[dt.date], done: set[dt.date], as_of: dt.date | None,
                    full: bool) -> tuple[dt.date, list[dt.date]]:
    """(as-of date, dates to process): every raw date <= as-of not yet ingested, plus as-of itself."""
    if not raw_dates:
        raise SourceError("the source has no events to ingest")
    as_of = as_of or max(raw_dates)
    eligible = [d for d in raw_dates if d <= as_of]
    if full:
        return as_of, eligible
    todo = sorted({d for d in eligible if d not in done} | ({as_of} if as_of in raw_dates else set()))
    return as_of, todo


def _sql_dates(dates: list[dt.date]) -> str:
    return ", ".join(f"DATE'{d.isoformat()}'" for d in dates)


# --------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestResult:
    as_of_date: dt.date
    dates: list[dt.date]
    rows_in: int
    rows_out: int
    quarantined: int
    duplicates: int
    reasons: dict[str, int]
    items_out: int
    items_quarantined: int


def run_ingest(spark: "SparkSession", settings: Settings, key: PseudonymKey, run: StageRun,
               as_of: dt.date | None = None, full: bool = False) -> IngestResult:
    """Ingest raw events up to ``as_of`` (default: the latest raw date) and the item catalog."""
    from pyspark import StorageLevel

    tables = Tables(spark, settings.storage)
    require_same_key(tables, key, settings.privacy.key_env)  # before any write
    source = settings.source
    if settings.dataset.adapter:
        from userlens.datasets import read_events

        dataset = read_events(spark, settings)  # a missing file or a wrong format fails here, before any write
        raw, user_field, partition_dates = dataset.frame, dataset.user_field, None
    else:
        events_path = source.events_location()
        partition_dates = list_partition_dates(spark, events_path, source.date_partition)
        raw = read_raw(spark, events_path, source.format, source.mapping.model_dump(), source)
        user_field = source.mapping.user_id
    if partition_dates is not None:
        raw_dates = partition_dates
        date_of_raw = F.col("source_date")
    else:
        # no date folders: the date comes from the event time (a full scan of one column)
        date_of_raw = F.to_date(parse_event_time(F.col("f_event_time"), source.timestamp_format))
        raw_dates = sorted(r[0] for r in raw.select(date_of_raw.alias("d")).where("d IS NOT NULL")
                           .distinct().collect())
    done: set[dt.date] = set()
    if not full and tables.exists("events"):
        done |= {r[0] for r in tables.read("events").select("event_date").distinct().collect()}
    if not full and tables.exists("events_quarantine"):
        done |= {r[0] for r in tables.read("events_quarantine").where("source = 'events'")
                 .select("source_date").distinct().collect() if r[0] is not None}
    as_of, todo = dates_to_ingest(raw_dates, done, as_of, full)
    run.as_of_date = as_of
    log.info("ingest: %d raw date(s) to process up to %s: %s", len(todo), as_of,
             ", ".join(d.isoformat() for d in todo) or "none")

    if not todo:
        log.info("ingest: no raw dates up to %s; refreshing the item catalog only", as_of)
        items_out, items_quarantined = ingest_items(spark, settings, tables, run.run_id)
        record_key_id(tables, key)
        run.rows_in, run.rows_out = 0, 0
        run.details.update({"dates": [], "items_out": items_out, "items_quarantined": items_quarantined,
                            "key_id": key.key_id, "full": full})
        return IngestResult(as_of, [], 0, 0, 0, 0, {}, items_out, items_quarantined)

    in_scope = date_of_raw.isin(*todo)
    if partition_dates is None:
        in_scope = in_scope | date_of_raw.isNull()  # undated bad rows are re-quarantined, idempotently
    classified = classify_events(raw.where(in_scope), settings, key).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {(r["status"], r["reason"]): r["n"]
                  for r in classified.groupBy("status", "reason").agg(F.count(F.lit(1)).alias("n")).collect()}
        rows_in = sum(counts.values())
        duplicates = sum(n for (status, _), n in counts.items() if status == DUPLICATE)
        reasons = {reason: n for (status, reason), n in counts.items() if status == QUARANTINED}

        events = classified.where(F.col("status") == OK).withColumn("run_id", F.lit(run.run_id))
        now = dt.datetime.now(dt.timezone.utc)
        # raw is JSON for every format (non-JSON rows are rendered with to_json)
        quarantine = quarantine_rows(classified, "events", user_field, run.run_id, now)
        if full:
            written = tables.overwrite("events", events)
            q_condition = "source = 'events'"
        else:
            written = tables.replace_where("events", events, f"event_date IN ({_sql_dates(todo)})",
                                           unless_same=("run_id",))
            q_condition = f"source = 'events' AND (source_date IN ({_sql_dates(todo)}) OR source_date IS NULL)"
        rows_out = written.get("numInsertedRows", 0)
        q_written = tables.replace_where("events_quarantine", quarantine, q_condition,
                                         unless_same=("run_id", "quarantined_at")).get("numInsertedRows", 0)
    finally:
        classified.unpersist()
    record_key_id(tables, key)

    accounted = rows_out + q_written + duplicates
    if accounted != rows_in:
        raise UserlensError(
            f"ingest accounting failed: rows_in={rows_in} but events={rows_out} + quarantined={q_written} "
            f"+ duplicates={duplicates} = {accounted}")
    log.info("ingest: rows_in=%d = events %d + quarantined %d + duplicates %d", rows_in, rows_out, q_written,
             duplicates)
    for reason, n in sorted(reasons.items()):
        log.info("ingest: quarantined %-20s %d", reason, n)

    items_out, items_quarantined = ingest_items(spark, settings, tables, run.run_id)
    result = IngestResult(as_of, todo, rows_in, rows_out, q_written, duplicates, reasons, items_out,
                          items_quarantined)
    run.rows_in, run.rows_out = rows_in, rows_out
    run.details.update({"dates": [d.isoformat() for d in todo], "quarantined": q_written, "duplicates": duplicates,
                        "reasons": reasons, "items_out": items_out, "items_quarantined": items_quarantined,
                        "key_id": key.key_id, "full": full})
    return result


def ingest_items(spark: "SparkSession", settings: Settings, tables: Tables, run_id: str) -> tuple[int, int]:
    """Replace ``items`` with the current catalog snapshot; bad rows go to quarantine."""
    source = settings.source
    if settings.dataset.adapter:
        from userlens.datasets import read_items

        raw = read_items(spark, settings).frame
    else:
        fmt = source.items_format or source.format
        raw = read_raw(spark, source.items_location(), fmt, source.items_mapping.model_dump(), source)
    classified = classify_items(raw)
    items = classified.where(F.col("status") == OK).withColumn("run_id", F.lit(run_id))
    if tables.exists("items") and same_rows(tables.read("items"), items, ("run_id",)):
        written = tables.read("items").count()  # unchanged: no new table version, no new files
        log.info("ingest: the item catalog is unchanged")
    else:
        written = tables.overwrite("items", items).get("numInsertedRows", 0)
    now = dt.datetime.now(dt.timezone.utc)
    quarantine = quarantine_rows(classified, "items", None, run_id, now)
    q_written = tables.replace_where("events_quarantine", quarantine, "source = 'items'",
                                     unless_same=("run_id", "quarantined_at")).get("numInsertedRows", 0)
    log.info("ingest: items %d, quarantined %d", written, q_written)
    return written, q_written
