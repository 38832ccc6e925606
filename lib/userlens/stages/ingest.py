"""Ingest: raw logs -> ``events`` (+ ``events_quarantine``) and ``items``.

The runner: the pre-flight (:mod:`userlens.sources.preflight`), the dates to process, the raw rows
classified by :mod:`userlens.sources.raw`, the writes, and the accounting. Every raw row ends up in
exactly one place: ``events`` (status ``ok``), ``events_quarantine`` (redacted, with a reason) or
counted as a duplicate; rows_in = rows_out + rows_quarantined + duplicates is checked against the row
counts Delta reports for the writes.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from userlens.config import IngestSettings, Settings
from userlens.errors import QuarantineLimitError, SourceError, UserlensError, unreadable_file
from userlens.privacy import PseudonymKey, record_key_id, require_same_key
from userlens.runs import RunRecord, StageRun
from userlens.sources.preflight import check_source, field_roles
from userlens.sources.raw import (
    DUPLICATE,
    OK,
    QUARANTINED,
    classify_events,
    classify_items,
    classify_rows,
    duplicate_keys,
    mark_duplicates,
    parse_event_time,
    quarantine_rows,
    read_raw,
)
from userlens.spark import runtime_conf
from userlens.tables import Tables, same_rows

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# dates
# --------------------------------------------------------------------------
def list_partition_dates(spark: "SparkSession", path: str, column: str) -> list[dt.date] | None:
    """Dates of ``column=YYYY-MM-DD`` folders under ``path`` (Hadoop FS: local, HDFS, S3, DBFS).

    None when the layout has no such folders. Raises SourceError if ``path`` is missing.
    """
    jvm = spark.sparkContext._jvm
    assert jvm is not None  # set once the context has started
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
                dates.append(dt.date.fromisoformat(name[len(prefix) :]))
            except ValueError:
                log.warning("ignoring folder %s: not a %s=YYYY-MM-DD partition", name, column)
    return sorted(dates) or None


def dates_to_ingest(
    raw_dates: list[dt.date], done: set[dt.date], as_of: dt.date | None, full: bool
) -> tuple[dt.date, list[dt.date]]:
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
    key_id: str = ""
    full: bool = False
    items_skipped: tuple[str, ...] = ()  # of skipped_files, those of the item catalogue

    def run_record(self) -> RunRecord:
        events_skipped = [f for f in self.skipped_files if f not in self.items_skipped]
        details: dict[str, Any] = {
            "dates": [d.isoformat() for d in self.dates],
            "items_out": self.items_out,
            "items_quarantined": self.items_quarantined,
            "key_id": self.key_id,
            "full": self.full,
            **_skipped_detail(events_skipped, list(self.items_skipped)),
        }
        if self.dates:
            details.update({"duplicates": self.duplicates, "reasons": self.reasons, "quarantined": self.quarantined})
        return RunRecord(self.rows_in, self.rows_out, details)


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
                log.warning(
                    "ingest: skipping the unreadable %s file %s (%s; ingest.on_unreadable_file=skip)", what, path, cause
                )
                skipped.append(path)
                continue
            hint = (
                "set ingest.on_unreadable_file=skip to ingest the other files"
                if policy == "fail"
                else f"it stayed unreadable after {len(skipped)} file(s) were skipped"
            )
            raise SourceError(f"cannot read the {what} file {path}: {cause}; nothing was written ({hint})") from exc


def check_quarantine_limits(ingest: IngestSettings, rows_in: int, reasons: dict[str, int]) -> str | None:
    """Why the run's quarantine is over ``ingest.max_quarantine_fraction`` / ``max_reason_fraction``, or None."""
    if not rows_in:
        return None
    total = sum(reasons.values())
    listed = ", ".join(f"{r} {n:,}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    if total / rows_in > ingest.max_quarantine_fraction:
        return (
            f"{total:,} of {rows_in:,} rows ({total / rows_in:.1%}) were quarantined, above "
            f"ingest.max_quarantine_fraction={ingest.max_quarantine_fraction:g} ({listed})"
        )
    for reason, limit in sorted(ingest.max_reason_fraction.items()):
        n = reasons.get(reason, 0)
        if n / rows_in > limit:
            return (
                f"{n:,} of {rows_in:,} rows ({n / rows_in:.1%}) were quarantined as {reason}, above "
                f"ingest.max_reason_fraction.{reason}={limit:g}"
            )
    return None


@dataclass(frozen=True)
class _Events:
    """The source as read for one run: rows in the raw contract and what quarantine redaction needs."""

    raw: DataFrame
    roles: dict[str, str]
    partition_dates: list[dt.date] | None


@dataclass(frozen=True)
class _Classified:
    """The persisted classified rows and duplicate groups of one run. A valid row's copies are valid rows
    (the same user_key and event_id) and a quarantined row's are quarantined rows (the same raw text), so
    the valid and the refused rows are marked apart: each write reads only its own rows."""

    rows: DataFrame
    groups: DataFrame

    @property
    def frame(self) -> DataFrame:
        return mark_duplicates(self.rows, self.groups)

    def valid(self) -> DataFrame:
        return mark_duplicates(self.rows.where(F.col("reason").isNull()), self.groups)

    def refused(self) -> DataFrame:
        return mark_duplicates(self.rows.where(F.col("reason").isNotNull()), self.groups)

    def unpersist(self) -> None:
        self.rows.unpersist()
        self.groups.unpersist()


def _read_events(spark: "SparkSession", settings: Settings, skipped: Sequence[str]) -> _Events:
    source = settings.source
    if settings.dataset.adapter:
        from userlens.sources.datasets import read_events

        if skipped:
            raise SourceError(f"cannot skip {skipped[0]}: a dataset adapter reads fixed files")
        dataset = read_events(spark, settings)  # a missing file or a wrong format fails here, before any write
        roles = {dataset.user_field: "user_id"} if dataset.user_field else {}
        return _Events(dataset.frame, roles, None)
    events_path = source.events_location()
    mapping = source.mapping.model_dump()
    return _Events(
        read_raw(spark, events_path, source.format, mapping, source, skipped),
        field_roles(mapping),
        list_partition_dates(spark, events_path, source.date_partition),
    )


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


def run_ingest(
    spark: "SparkSession",
    settings: Settings,
    key: PseudonymKey,
    run: StageRun,
    as_of: dt.date | None = None,
    full: bool = False,
) -> IngestResult:
    """Ingest raw events up to ``as_of`` (default: the latest raw date) and the item catalog."""
    from pyspark import StorageLevel

    tables = Tables(spark, settings.storage)
    require_same_key(tables, key, settings.privacy.key_env)  # before any write
    check_source(settings, spark)  # paths and mapping, before any read of the data
    source = settings.source
    done = set() if full else _done_dates(tables)

    def classify(skipped: list[str]) -> tuple[_Events, dt.date, list[dt.date], _Classified | None, dict]:
        read = _read_events(spark, settings, skipped)
        if read.partition_dates is not None:
            raw_dates, date_of_raw = read.partition_dates, F.col("source_date")
        else:
            # no date folders: the date comes from the event time (a full scan of one column)
            date_of_raw = F.to_date(parse_event_time(F.col("f_event_time"), source.timestamp_format))
            raw_dates = sorted(
                r[0] for r in read.raw.select(date_of_raw.alias("d")).where("d IS NOT NULL").distinct().collect()
            )
        as_of_date, todo = dates_to_ingest(raw_dates, done, as_of, full)
        if not todo:
            return read, as_of_date, todo, None, {}
        in_scope = date_of_raw.isin(*todo)
        if read.partition_dates is None:
            in_scope = in_scope | date_of_raw.isNull()  # undated bad rows are re-quarantined, idempotently
        # The source is parsed and classified once (persisted); duplicate groups are found by a hash
        # aggregate over the cached rows, and only their rows are ranked (sources.raw.mark_duplicates).
        # Cached without column compression: building the compressed columnar cache of these rows cost
        # 20 s of a 140 s ingest at 10^7 events on 2 cores, the uncompressed one 4 s (bench/ingest.py); the
        # rows live only for the run. The setting is read when the plan is cached.
        with runtime_conf(spark, {"spark.sql.inMemoryColumnarStorage.compressed": "false"}):
            rows = classify_rows(read.raw.where(in_scope), settings, key).persist(StorageLevel.MEMORY_AND_DISK)
        groups = duplicate_keys(rows).persist(StorageLevel.MEMORY_AND_DISK)
        classified = _Classified(rows, groups)
        try:
            counts = {
                (r["status"], r["reason"]): r["n"]
                for r in classified.frame.groupBy("status", "reason").agg(F.count(F.lit(1)).alias("n")).collect()
            }
        except Exception:
            classified.unpersist()
            raise
        return read, as_of_date, todo, classified, counts

    (read, as_of, todo, classified, counts), skipped = read_skipping_unreadable(
        classify, settings.ingest.on_unreadable_file, "events"
    )
    run.as_of_date = as_of
    log.info(
        "ingest: %d raw date(s) to process up to %s: %s",
        len(todo),
        as_of,
        ", ".join(d.isoformat() for d in todo) or "none",
    )

    if classified is None:
        log.info("ingest: no raw dates up to %s; refreshing the item catalog only", as_of)
        items_out, items_quarantined, items_skipped = ingest_items(spark, settings, tables, run.run_id, key)
        record_key_id(tables, key)
        return IngestResult(
            as_of,
            [],
            0,
            0,
            0,
            0,
            {},
            items_out,
            items_quarantined,
            tuple(skipped + items_skipped),
            key.key_id,
            full,
            tuple(items_skipped),
        )

    try:
        rows_in = sum(counts.values())
        duplicates = sum(n for (status, _), n in counts.items() if status == DUPLICATE)
        reasons = {reason: n for (status, reason), n in counts.items() if status == QUARANTINED}
        # what a failed run's row says (the successful run's comes from its result)
        partial = {
            "dates": [d.isoformat() for d in todo],
            "duplicates": duplicates,
            "reasons": reasons,
            "key_id": key.key_id,
            "full": full,
            **({"skipped_files": skipped} if skipped else {}),
        }
        over_limit = check_quarantine_limits(settings.ingest, rows_in, reasons)

        now = dt.datetime.now(dt.timezone.utc)
        # raw is JSON for every format (non-JSON rows are rendered with to_json)
        quarantine = quarantine_rows(classified.refused(), "events", read.roles, key, run.run_id, now)
        q_condition = (
            "source = 'events'"
            if full
            else f"source = 'events' AND (source_date IN ({_sql_dates(todo)}) OR source_date IS NULL)"
        )
        if over_limit:
            # nothing goes to events; the refused rows are kept (redacted) for the diagnosis, beside the rows
            # of the run that last ingested these dates (a good run replaces both)
            q_written = tables.replace_where(
                "events_quarantine", quarantine, f"{q_condition} AND run_id = '{run.run_id}'"
            ).get("numInsertedRows", 0)
            raise QuarantineLimitError(
                f"ingest: {over_limit}; nothing was written to events, the rows are in events_quarantine "
                f"(run_id {run.run_id}). Check source.mapping with `userlens check-source`",
                rows_in=rows_in,
                details={**partial, "quarantined": q_written},
            )
        events = classified.valid().where(F.col("status") == OK).withColumn("run_id", F.lit(run.run_id))
        if full:
            written = tables.overwrite("events", events)
        else:
            written = tables.replace_where(
                "events", events, f"event_date IN ({_sql_dates(todo)})", unless_same=("run_id",)
            )
        rows_out = written.get("numInsertedRows", 0)
        q_written = tables.replace_where(
            "events_quarantine", quarantine, q_condition, unless_same=("run_id", "quarantined_at")
        ).get("numInsertedRows", 0)
    finally:
        classified.unpersist()
    record_key_id(tables, key)

    accounted = rows_out + q_written + duplicates
    if accounted != rows_in:
        raise UserlensError(
            f"ingest accounting failed: rows_in={rows_in} but events={rows_out} + quarantined={q_written} "
            f"+ duplicates={duplicates} = {accounted}",
            rows_in=rows_in,
            details={**partial, "quarantined": q_written},
        )
    log.info(
        "ingest: rows_in=%d = events %d + quarantined %d + duplicates %d", rows_in, rows_out, q_written, duplicates
    )
    for reason, n in sorted(reasons.items()):
        log.info("ingest: quarantined %-20s %d", reason, n)

    items_out, items_quarantined, items_skipped = ingest_items(spark, settings, tables, run.run_id, key)
    result = IngestResult(
        as_of,
        todo,
        rows_in,
        rows_out,
        q_written,
        duplicates,
        reasons,
        items_out,
        items_quarantined,
        tuple(skipped + items_skipped),
        key.key_id,
        full,
        tuple(items_skipped),
    )
    return result


def _skipped_detail(events: list[str], items: list[str]) -> dict[str, object]:
    return {"skipped_files": events + items, "files_skipped": len(events) + len(items)} if events or items else {}


def ingest_items(
    spark: "SparkSession", settings: Settings, tables: Tables, run_id: str, key: PseudonymKey
) -> tuple[int, int, list[str]]:
    """Replace ``items`` with the current catalog snapshot; bad rows go to quarantine.
    (items written, items quarantined, unreadable item files skipped)."""
    from pyspark import StorageLevel

    source = settings.source

    def classify(skipped: list[str]) -> tuple[DataFrame, dict[str, str]]:
        if settings.dataset.adapter:
            from userlens.sources.datasets import read_items

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
        q_written = tables.replace_where(
            "events_quarantine", quarantine, "source = 'items'", unless_same=("run_id", "quarantined_at")
        ).get("numInsertedRows", 0)
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
        refused = (
            (" (" + ", ".join(f"{r} {n:,}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])) + ")")
            if self.reasons
            else ""
        )
        lines = [
            f"source: {self.location} ({self.format}; columns: {', '.join(self.columns) or 'none'})",
            f"mapping: {mapped}" + (f"; unmapped: {unmapped}" if unmapped else ""),
            *[f"warning: {w}" for w in self.warnings],
            f"sample: the first {self.sampled:,} rows: "
            + ", ".join(f"{n:,} {status}" for status, n in sorted(self.statuses.items()))
            + refused,
        ]
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
    classified = (
        classify_events(sample, settings, key)
        .withColumn(
            "status",
            F.when(F.col("status") == QUARANTINED, F.concat(F.lit("quarantined: "), F.col("reason"))).otherwise(
                F.col("status")
            ),
        )
        .cache()
    )
    try:
        counts = {
            (r["s"], r["reason"]): r["n"]
            for r in classified.groupBy(F.split("status", ":")[0].alias("s"), "reason")
            .agg(F.count(F.lit(1)).alias("n"))
            .collect()
        }
        rows = [
            r.asDict()
            for r in classified.orderBy(F.col("status") != "ok", "event_time")
            .select(*_SHOWN, "status")
            .limit(SHOWN_ROWS)
            .collect()
        ]
    finally:
        classified.unpersist()
    statuses: dict[str, int] = {}
    for (status, _), n in counts.items():
        statuses[status] = statuses.get(status, 0) + n
    columns: Sequence[str] = read.raw.columns if settings.dataset.adapter else ()
    if not settings.dataset.adapter:
        from userlens.sources.preflight import source_columns

        found = source_columns(settings, spark, items=False).get("events")
        columns = found.columns if found else ()
    return SourceCheck(
        source.path if settings.dataset.adapter else source.events_location(),
        settings.dataset.adapter or source.format,
        tuple(columns),
        {} if settings.dataset.adapter else source.mapping.model_dump(),
        sum(statuses.values()),
        statuses,
        {r: n for (s, r), n in counts.items() if s == QUARANTINED},
        rows,
        warnings,
    )
