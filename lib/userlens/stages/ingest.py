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
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.config import IngestSettings, Settings, SourceSettings
from userlens.errors import QuarantineLimitError, SourceError, UserlensError, first_line, unreadable_file
from userlens.privacy import PseudonymKey, pseudonymize, record_key_id, require_same_key, scrub_pii
from userlens.sources.preflight import check_source, field_roles
from userlens.sources.redact import redact_raw_record
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
             source: SourceSettings, exclude: Sequence[str] = ()) -> DataFrame:
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
            df = (reader.option("header", str(source.csv_header).lower()).option("mode", "PERMISSIVE")
                  .option("inferSchema", "false").csv(target))
        else:
            df = reader.format(fmt).load(target)
    except Exception as exc:  # noqa: BLE001 - surfaced as one line
        raise SourceError(f"cannot read {fmt} source at {path}: {first_line(exc)}") from exc

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


def _file_path(location: str) -> str:
    """A file's path without its ``file:`` scheme (Spark writes file:///x, Hadoop lists file:/x)."""
    return re.sub(r"^file:/*", "/", location)


def list_data_files(spark: "SparkSession", path: str) -> list[str]:
    """Every data file under ``path`` as Spark reads them (names starting with ``.`` or ``_`` skipped)."""
    jvm = spark.sparkContext._jvm
    root = jvm.org.apache.hadoop.fs.Path(path)
    fs = root.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    files, listing = [], fs.listFiles(root, True)
    while listing.hasNext():
        file_path = listing.next().getPath()
        relative = str(file_path.toUri().getPath())[len(str(root.toUri().getPath())):]
        if not any(part.startswith((".", "_")) for part in relative.split("/") if part):
            files.append(str(file_path))
    return sorted(files)


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


def quarantine_rows(classified: DataFrame, source_name: str, roles: dict[str, str], key: PseudonymKey,
                    run_id: str, now: dt.datetime) -> DataFrame:
    """Quarantined rows as ``events_quarantine`` rows; the raw text keeps no value that could identify a
    person, whatever the mapping (:mod:`userlens.sources.redact`)."""
    return classified.where(F.col("status") == QUARANTINED).select(
        redact_raw_record(F.col("raw"), roles, key).alias("raw"), "reason", F.lit(source_name).alias("source"),
        F.lit(run_id).alias("run_id"), "source_date", "user_key",
        F.lit(now).cast(T.TimestampType()).alias("quarantined_at"),
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
    skipped_files: tuple[str, ...] = ()


MAX_SKIPPED_FILES = 1000  # ingest.on_unreadable_file: skip gives up (and fails) past this many
T_ = TypeVar("T_")


def read_skipping_unreadable(build: Callable[[list[str]], T_], policy: str, what: str) -> tuple[T_, list[str]]:
    """``build(skipped)``, where a file Spark cannot read fails the run with one line naming it
    (``policy`` fail) or is left out and ``build`` retried without it (skip); (result, skipped files)."""
    skipped: list[str] = []
    while True:
        try:
            return build(list(skipped)), skipped
        except Exception as exc:
            found = unreadable_file(exc)
            if found is None:
                raise
            path, cause = found
            if policy == "skip" and path not in skipped and len(skipped) < MAX_SKIPPED_FILES:
                log.warning("ingest: skipping the unreadable %s file %s (%s; ingest.on_unreadable_file=skip)",
                            what, path, cause)
                skipped.append(path)
                continue
            hint = ("set ingest.on_unreadable_file=skip to ingest the other files" if policy == "fail"
                    else f"it stayed unreadable after {len(skipped)} file(s) were skipped")
            raise SourceError(f"cannot read the {what} file {path}: {cause}; nothing was written ({hint})") from exc


def check_quarantine_limits(ingest: IngestSettings, rows_in: int, reasons: dict[str, int]) -> str | None:
    """Why the run's quarantine is over ``ingest.max_quarantine_fraction`` / ``max_reason_fraction``, or None."""
    if not rows_in:
        return None
    total = sum(reasons.values())
    listed = ", ".join(f"{r} {n:,}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    if total / rows_in > ingest.max_quarantine_fraction:
        return (f"{total:,} of {rows_in:,} rows ({total / rows_in:.1%}) were quarantined, above "
                f"ingest.max_quarantine_fraction={ingest.max_quarantine_fraction:g} ({listed})")
    for reason, limit in sorted(ingest.max_reason_fraction.items()):
        n = reasons.get(reason, 0)
        if n / rows_in > limit:
            return (f"{n:,} of {rows_in:,} rows ({n / rows_in:.1%}) were quarantined as {reason}, above "
                    f"ingest.max_reason_fraction.{reason}={limit:g}")
    return None


@dataclass(frozen=True)
class _Events:
    """The source as read for one run: rows in the raw contract and what quarantine redaction needs."""

    raw: DataFrame
    roles: dict[str, str]
    partition_dates: list[dt.date] | None


def _read_events(spark: "SparkSession", settings: Settings, skipped: Sequence[str]) -> _Events:
    source = settings.source
    if settings.dataset.adapter:
        from userlens.datasets import read_events

        if skipped:
            raise SourceError(f"cannot skip {skipped[0]}: a dataset adapter reads fixed files")
        dataset = read_events(spark, settings)  # a missing file or a wrong format fails here, before any write
        roles = {dataset.user_field: "user_id"} if dataset.user_field else {}
        return _Events(dataset.frame, roles, None)
    events_path = source.events_location()
    mapping = source.mapping.model_dump()
    return _Events(read_raw(spark, events_path, source.format, mapping, source, skipped), field_roles(mapping),
                   list_partition_dates(spark, events_path, source.date_partition))


def _done_dates(tables: Tables) -> set[dt.date]:
    """Dates already ingested: in events, or (every row refused) in the quarantine of a run that did not fail."""
    done: set[dt.date] = set()
    if tables.exists("events"):
        done |= {r[0] for r in tables.read("events").select("event_date").distinct().collect()}
    if tables.exists("events_quarantine"):
        quarantined = tables.read("events_quarantine").where("source = 'events' AND source_date IS NOT NULL")
        if tables.exists("pipeline_runs"):
            failed = tables.read("pipeline_runs").where("stage = 'ingest' AND status = 'failed'").select("run_id")
            quarantined = quarantined.join(failed, "run_id", "left_anti")
        done |= {r[0] for r in quarantined.select("source_date").distinct().collect()}
    return done


def run_ingest(spark: "SparkSession", settings: Settings, key: PseudonymKey, run: StageRun,
               as_of: dt.date | None = None, full: bool = False) -> IngestResult:
    """Ingest raw events up to ``as_of`` (default: the latest raw date) and the item catalog."""
    from pyspark import StorageLevel

    tables = Tables(spark, settings.storage)
    require_same_key(tables, key, settings.privacy.key_env)  # before any write
    check_source(settings, spark)  # paths and mapping, before any read of the data
    source = settings.source
    done = set() if full else _done_dates(tables)

    def classify(skipped: list[str]) -> tuple[_Events, dt.date, list[dt.date], DataFrame | None, dict]:
        read = _read_events(spark, settings, skipped)
        if read.partition_dates is not None:
            raw_dates, date_of_raw = read.partition_dates, F.col("source_date")
        else:
            # no date folders: the date comes from the event time (a full scan of one column)
            date_of_raw = F.to_date(parse_event_time(F.col("f_event_time"), source.timestamp_format))
            raw_dates = sorted(r[0] for r in read.raw.select(date_of_raw.alias("d")).where("d IS NOT NULL")
                               .distinct().collect())
        as_of_date, todo = dates_to_ingest(raw_dates, done, as_of, full)
        if not todo:
            return read, as_of_date, todo, None, {}
        in_scope = date_of_raw.isin(*todo)
        if read.partition_dates is None:
            in_scope = in_scope | date_of_raw.isNull()  # undated bad rows are re-quarantined, idempotently
        classified = classify_events(read.raw.where(in_scope), settings, key).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            counts = {(r["status"], r["reason"]): r["n"] for r in
                      classified.groupBy("status", "reason").agg(F.count(F.lit(1)).alias("n")).collect()}
        except Exception:
            classified.unpersist()
            raise
        return read, as_of_date, todo, classified, counts

    (read, as_of, todo, classified, counts), skipped = read_skipping_unreadable(
        classify, settings.ingest.on_unreadable_file, "events")
    run.as_of_date = as_of
    log.info("ingest: %d raw date(s) to process up to %s: %s", len(todo), as_of,
             ", ".join(d.isoformat() for d in todo) or "none")
    if skipped:
        run.details["skipped_files"] = skipped

    if classified is None:
        log.info("ingest: no raw dates up to %s; refreshing the item catalog only", as_of)
        items_out, items_quarantined, items_skipped = ingest_items(spark, settings, tables, run.run_id, key)
        record_key_id(tables, key)
        run.rows_in, run.rows_out = 0, 0
        run.details.update({"dates": [], "items_out": items_out, "items_quarantined": items_quarantined,
                            "key_id": key.key_id, "full": full, **_skipped_detail(skipped, items_skipped)})
        return IngestResult(as_of, [], 0, 0, 0, 0, {}, items_out, items_quarantined,
                            tuple(skipped + items_skipped))

    try:
        rows_in = sum(counts.values())
        duplicates = sum(n for (status, _), n in counts.items() if status == DUPLICATE)
        reasons = {reason: n for (status, reason), n in counts.items() if status == QUARANTINED}
        run.rows_in = rows_in
        run.details.update({"dates": [d.isoformat() for d in todo], "duplicates": duplicates, "reasons": reasons,
                            "key_id": key.key_id, "full": full})
        over_limit = check_quarantine_limits(settings.ingest, rows_in, reasons)

        now = dt.datetime.now(dt.timezone.utc)
        # raw is JSON for every format (non-JSON rows are rendered with to_json)
        quarantine = quarantine_rows(classified, "events", read.roles, key, run.run_id, now)
        q_condition = ("source = 'events'" if full else
                       f"source = 'events' AND (source_date IN ({_sql_dates(todo)}) OR source_date IS NULL)")
        if over_limit:
            # nothing goes to events; the refused rows are kept (redacted) for the diagnosis, beside the rows
            # of the run that last ingested these dates (a good run replaces both)
            q_written = tables.replace_where("events_quarantine", quarantine,
                                             f"{q_condition} AND run_id = '{run.run_id}'").get("numInsertedRows", 0)
            run.rows_out = 0
            run.details["quarantined"] = q_written
            raise QuarantineLimitError(
                f"ingest: {over_limit}; nothing was written to events, the rows are in events_quarantine "
                f"(run_id {run.run_id}). Check source.mapping with `userlens check-source`")
        events = classified.where(F.col("status") == OK).withColumn("run_id", F.lit(run.run_id))
        if full:
            written = tables.overwrite("events", events)
        else:
            written = tables.replace_where("events", events, f"event_date IN ({_sql_dates(todo)})",
                                           unless_same=("run_id",))
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

    items_out, items_quarantined, items_skipped = ingest_items(spark, settings, tables, run.run_id, key)
    result = IngestResult(as_of, todo, rows_in, rows_out, q_written, duplicates, reasons, items_out,
                          items_quarantined, tuple(skipped + items_skipped))
    run.rows_out = rows_out
    run.details.update({"quarantined": q_written, "items_out": items_out, "items_quarantined": items_quarantined,
                        **_skipped_detail(skipped, items_skipped)})
    return result


def _skipped_detail(events: list[str], items: list[str]) -> dict[str, object]:
    return {"skipped_files": events + items, "files_skipped": len(events) + len(items)} if events or items else {}


def ingest_items(spark: "SparkSession", settings: Settings, tables: Tables, run_id: str,
                 key: PseudonymKey) -> tuple[int, int, list[str]]:
    """Replace ``items`` with the current catalog snapshot; bad rows go to quarantine.
    (items written, items quarantined, unreadable item files skipped)."""
    from pyspark import StorageLevel

    source = settings.source

    def classify(skipped: list[str]) -> tuple[DataFrame, dict[str, str]]:
        if settings.dataset.adapter:
            from userlens.datasets import read_items

            raw, roles = read_items(spark, settings).frame, {}
        else:
            fmt = source.items_format or source.format
            mapping = source.items_mapping.model_dump()
            raw = read_raw(spark, source.items_location(), fmt, mapping, source, skipped)
            roles = field_roles(mapping)
        classified = classify_items(raw).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            classified.count()  # reads every file once: an unreadable one fails here, before any write
        except Exception:
            classified.unpersist()
            raise
        return classified, roles

    (classified, roles), skipped = read_skipping_unreadable(classify, settings.ingest.on_unreadable_file, "items")
    try:
        items = classified.where(F.col("status") == OK).withColumn("run_id", F.lit(run_id))
        if tables.exists("items") and same_rows(tables.read("items"), items, ("run_id",)):
            written = tables.read("items").count()  # unchanged: no new table version, no new files
            log.info("ingest: the item catalog is unchanged")
        else:
            written = tables.overwrite("items", items).get("numInsertedRows", 0)
        now = dt.datetime.now(dt.timezone.utc)
        quarantine = quarantine_rows(classified, "items", roles, key, run_id, now)
        q_written = tables.replace_where("events_quarantine", quarantine, "source = 'items'",
                                         unless_same=("run_id", "quarantined_at")).get("numInsertedRows", 0)
    finally:
        classified.unpersist()
    log.info("ingest: items %d, quarantined %d", written, q_written)
    return written, q_written, skipped


# --------------------------------------------------------------------------
# userlens check-source
# --------------------------------------------------------------------------
SAMPLE_ROWS = 1000
SHOWN_ROWS = 5
_SHOWN = ("user_key", "event_time", "event_type", "item_id", "category", "price", "quantity", "query", "text")


@dataclass(frozen=True)
class SourceCheck:
    """What ``userlens check-source`` found: the columns, the mapping, and a classified sample."""

    location: str
    format: str
    columns: tuple[str, ...]
    mapping: dict[str, str | None]
    sampled: int
    statuses: dict[str, int]
    reasons: dict[str, int]
    rows: list[dict[str, object]]
    warnings: list[str]

    def describe(self) -> str:
        mapped = ", ".join(f"{field} <- {column}" for field, column in self.mapping.items() if column)
        unmapped = ", ".join(field for field, column in self.mapping.items() if not column)
        refused = (" (" + ", ".join(f"{r} {n:,}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
                   + ")") if self.reasons else ""
        lines = [f"source: {self.location} ({self.format}; columns: {', '.join(self.columns) or 'none'})",
                 f"mapping: {mapped}" + (f"; unmapped: {unmapped}" if unmapped else ""),
                 *[f"warning: {w}" for w in self.warnings],
                 f"sample: the first {self.sampled:,} rows: " + ", ".join(
                     f"{n:,} {status}" for status, n in sorted(self.statuses.items())) + refused]
        if self.rows:
            table = [[*_SHOWN, "status"]] + [[_cell(row.get(c)) for c in [*_SHOWN, "status"]] for row in self.rows]
            widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text if len(text) <= 24 else text[:12] + "…" + text[-4:] if text.isalnum() else text[:23] + "…"


def check_source_sample(spark: "SparkSession", settings: Settings, key: PseudonymKey) -> SourceCheck:
    """The pre-flight, then the first SAMPLE_ROWS raw events classified as ingest would; nothing is written."""
    warnings = check_source(settings, spark)
    source = settings.source
    read = _read_events(spark, settings, ())
    sample = read.raw.limit(SAMPLE_ROWS)
    classified = classify_events(sample, settings, key).withColumn(
        "status", F.when(F.col("status") == QUARANTINED, F.concat(F.lit("quarantined: "), F.col("reason")))
        .otherwise(F.col("status"))).cache()
    try:
        counts = {(r["s"], r["reason"]): r["n"] for r in classified.groupBy(
            F.split("status", ":")[0].alias("s"), "reason").agg(F.count(F.lit(1)).alias("n")).collect()}
        rows = [r.asDict() for r in classified.orderBy(F.col("status") != "ok", "event_time")
                .select(*_SHOWN, "status").limit(SHOWN_ROWS).collect()]
    finally:
        classified.unpersist()
    statuses: dict[str, int] = {}
    for (status, _), n in counts.items():
        statuses[status] = statuses.get(status, 0) + n
    columns = read.raw.columns if settings.dataset.adapter else ()
    if not settings.dataset.adapter:
        from userlens.sources.preflight import source_columns

        found = source_columns(settings, spark, items=False).get("events")
        columns = found.columns if found else ()
    return SourceCheck(source.path if settings.dataset.adapter else source.events_location(),
                       settings.dataset.adapter or source.format, tuple(columns),
                       {} if settings.dataset.adapter else source.mapping.model_dump(), sum(statuses.values()),
                       statuses, {r: n for (s, r), n in counts.items() if s == QUARANTINED}, rows, warnings)
