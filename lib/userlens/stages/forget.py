"""Forget: erase one person (GDPR art. 17) from every table, the training snapshots and the old files.

``userlens forget --user-id RAW_ID`` prints one line (:func:`describe`)::

    forget: user_key 6f1c…e2a0: 143 rows deleted (events 131, events_quarantine 2, user_texts 3,
    user_embeddings 1, user_scores 3, user_profiles 1) and 2 rows in 2 snapshot files; old files purged

(one line on the terminal, with the full 64-hex user_key; shortened and wrapped here). Steps:

1. ``user_key`` = HMAC-SHA256 of the trimmed raw id, exactly as ingest computes it.
2. Delta DELETE ``user_key = '<key>'`` in every existing table of ``TABLES`` with a
   ``user_key`` column (``forget_log``, the audit trail, and ``pipeline_runs`` are
   not erased). ``events_quarantine`` also loses the rows whose ``raw`` text holds
   the raw id as a token (``u12`` does not match ``u123``); those go by a MERGE
   whose condition names no literal, so the raw id never lands in the Delta log
   (a DELETE records its predicate in the commit).
3. Training snapshots (``<storage.models>/snapshots/*/split=*/part-*.parquet``):
   each file that holds the user_key is rewritten without those rows.
4. Each table that lost rows: ``REORG TABLE ... APPLY (PURGE)`` when deletion
   vectors are on (the rows are still inside the old files until then), then
   ``VACUUM`` with ``privacy.forget_retention_hours``.
5. One ``forget_log`` row: user_key, time, counts, whether the old files are gone.

The raw id is never logged, stored or put in an exception message. Models
trained on the person keep what they learned: retraining removes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pyspark.sql import functions as F

from userlens.artifacts import ModelStore
from userlens.config import Settings
from userlens.errors import ConfigError, UserlensError, first_line
from userlens.privacy import PseudonymKey, require_same_key
from userlens.runs import RunRecord, StageRun
from userlens.tables import TABLES, Tables, table_schema

if TYPE_CHECKING:
    from pyspark.sql import Column, SparkSession

log = logging.getLogger(__name__)

# forget_log is the audit trail (keyed by the pseudonym on purpose); pipeline_runs has no user rows
NOT_ERASED = frozenset({"forget_log", "pipeline_runs"})
QUARANTINE = "events_quarantine"
SNAPSHOTS = "snapshots"  # key of the snapshot row count in forget_log.tables
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
_DEFAULT_FILE_RETENTION_HOURS = 168.0  # Delta's delta.deletedFileRetentionDuration default: 1 week
_HOURS_PER_UNIT = {
    "week": 168.0,
    "day": 24.0,
    "hour": 1.0,
    "minute": 1 / 60,
    "second": 1 / 3600,
    "millisecond": 1 / 3_600_000,
    "microsecond": 1 / 3_600_000_000,
}


@dataclass(frozen=True)
class ForgetResult:
    """What one erasure found and removed; holds the pseudonym only, never the raw id."""

    user_key: str
    rows: dict[str, int]  # rows deleted per Delta table (tables that exist)
    snapshot_rows: int  # rows removed from training snapshot files
    snapshot_files: tuple[str, ...]  # snapshot files rewritten
    rows_found: int  # all of the above
    files_purged: bool  # no old file that held the person is left on storage
    retention_hours: int  # the VACUUM retention used

    def run_record(self) -> RunRecord:
        return RunRecord(
            self.rows_found,
            self.rows_found,
            {
                "user_key": self.user_key,
                "tables": self.rows,
                "snapshot_rows": self.snapshot_rows,
                "snapshot_files": len(self.snapshot_files),
                "files_purged": self.files_purged,
                "retention_hours": self.retention_hours,
            },
        )


def user_key_of(raw_id: str, key: PseudonymKey) -> str:
    """The ``user_key`` of a raw user id: equals Spark's ``pseudonymize`` (HMAC-SHA256, id trimmed of spaces)."""
    trimmed = raw_id.strip(" ")  # Spark's trim() removes spaces only
    if not trimmed:
        raise UserlensError("forget: the user id is empty")
    return hmac.new(key.secret, trimmed.encode("utf-8"), hashlib.sha256).hexdigest()


def raw_id_pattern(raw_id: str) -> str:
    """A Java regex that finds ``raw_id`` as a whole token in raw JSON text.

    Matches a JSON string value (``"user_id":"u12"``), a JSON number and a word
    in free text ("ask u12."), but not a longer id (``u123``, ``xu12``, ``u12-b``,
    ``u12.5``). Every character other than ASCII letters and digits is written
    as ``\\x{hex}``, so no id can inject regex syntax.
    """
    trimmed = raw_id.strip(" ")
    forms = dict.fromkeys([trimmed, json.dumps(trimmed)[1:-1], json.dumps(trimmed, ensure_ascii=False)[1:-1]])
    alternatives = "|".join(_java_literal(form) for form in forms)
    return rf"(?<![\w.@+-])(?:{alternatives})(?![\w@+-]|\.\w)"


def _java_literal(text: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text)


def holds_raw_id(raw: "Column", raw_id: str) -> "Column":
    """True where the raw text contains ``raw_id`` as a token (see :func:`raw_id_pattern`)."""
    return raw.rlike(raw_id_pattern(raw_id))


def describe(result: ForgetResult) -> str:
    """The one line ``userlens forget`` prints (module docstring has an example)."""
    per_table = ", ".join(f"{name} {n}" for name, n in result.rows.items())
    text = (
        f"forget: user_key {result.user_key}: {sum(result.rows.values())} rows deleted ({per_table or 'no tables yet'})"
    )
    if result.snapshot_files:
        text += f" and {result.snapshot_rows} rows in {len(result.snapshot_files)} snapshot files"
    if result.rows_found == 0:
        return text + "; no data held for this id"
    if result.files_purged:
        return text + "; old files purged"
    return (
        text + f"; old files go with the first VACUUM after {result.retention_hours} hours"
        " (privacy.forget_retention_hours)"
    )


def run_forget(
    spark: "SparkSession", settings: Settings, key: PseudonymKey, raw_id: str, run: StageRun
) -> ForgetResult:
    """Delete every row of one person, rewrite the snapshots that hold them, purge old files, audit."""
    user_key = user_key_of(raw_id, key)
    try:
        return _forget(spark, settings, key, user_key, raw_id, run)
    except Exception as exc:
        message = f"{type(exc).__name__}: {first_line(exc)}"
        if raw_id.strip(" ") in message:
            # an engine error may quote the query text; the raw id must not reach logs or pipeline_runs
            raise UserlensError("forget failed: " + message.replace(raw_id.strip(" "), "<user id>")) from None
        raise


def _forget(
    spark: "SparkSession", settings: Settings, key: PseudonymKey, user_key: str, raw_id: str, run: StageRun
) -> ForgetResult:
    tables = Tables(spark, settings.storage)
    # another key gives another user_key: the person would be "not found" and stay in every table
    require_same_key(tables, key, settings.privacy.key_env)
    hours = settings.privacy.forget_retention_hours
    names = [
        name
        for name, spec in TABLES.items()
        if name not in NOT_ERASED and "user_key" in spec.schema.fieldNames() and tables.exists(name)
    ]
    details = {name: _table_detail(tables, name) for name in names}
    _check_retention(spark, details, hours)  # before anything is deleted
    log.info("forget: user_key %s…: %d table(s): %s", user_key[:12], len(names), ", ".join(names) or "none")

    rows: dict[str, int] = {}
    for name in names:
        started = time.perf_counter()
        # a read that finds nothing costs a fraction of a DELETE's commit (an unknown id is common)
        held = not tables.read(name).where(F.col("user_key") == F.lit(user_key)).isEmpty()
        rows[name] = tables.delete(name, f"user_key = '{user_key}'") if held else 0
        if name == QUARANTINE:
            rows[name] += _delete_quarantine_by_raw_id(tables, raw_id)
        log.info("forget: %-18s %d row(s) deleted (%.1f s)", name, rows[name], time.perf_counter() - started)

    snapshot_files, snapshot_rows = forget_in_snapshots(ModelStore.of(settings).snapshots, user_key)
    rows_found = sum(rows.values()) + snapshot_rows
    touched = [name for name in names if rows[name] > 0]
    purged = False
    try:
        for name in touched:
            _purge(tables, name, details[name], hours)
        # with a retention above 0, VACUUM keeps the files it just replaced for that long
        purged = not touched or hours == 0
    finally:
        _audit(tables, run, user_key, rows_found, {**rows, SNAPSHOTS: snapshot_rows}, purged)

    result = ForgetResult(
        user_key=user_key,
        rows=rows,
        snapshot_rows=snapshot_rows,
        snapshot_files=tuple(snapshot_files),
        rows_found=rows_found,
        files_purged=purged,
        retention_hours=hours,
    )
    log.info(
        "forget: user_key %s…: %d row(s) found, old files %s",
        user_key[:12],
        rows_found,
        "purged" if purged else f"kept {hours} h (VACUUM removes them later)",
    )
    return result


# --------------------------------------------------------------------------
# Delta
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Detail:
    properties: dict[str, str]
    features: frozenset[str]

    @property
    def deletion_vectors(self) -> bool:
        # the feature stays after the property is turned off, and so may old deletion vectors
        return (
            self.properties.get("delta.enableDeletionVectors", "false").lower() == "true"
            or "deletionVectors" in self.features
        )


def _table_detail(tables: Tables, name: str) -> _Detail:
    row = tables.delta(name).detail().first()
    columns = row.asDict() if row is not None else {}
    return _Detail(dict(columns.get("properties") or {}), frozenset(columns.get("tableFeatures") or ()))


def file_retention_hours(properties: dict[str, str]) -> float | None:
    """``delta.deletedFileRetentionDuration`` in hours (default one week); None if unreadable."""
    text = properties.get("delta.deletedFileRetentionDuration", "interval 1 week").lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(week|day|hour|minute|second|millisecond|microsecond)s?\b", text)
    if not parts:
        return None
    return sum(float(n) * _HOURS_PER_UNIT[unit] for n, unit in parts)


def _check_retention(spark: "SparkSession", details: dict[str, _Detail], hours: int) -> None:
    # cast: RuntimeConfig.get is typed Optional[str] even with a str default
    if cast(str, spark.conf.get(RETENTION_CHECK, "true")).lower() != "true":
        return
    floors = [f for f in (file_retention_hours(d.properties) for d in details.values()) if f is not None]
    if floors and hours < max(floors):
        raise _retention_error(hours, max(floors))


def _retention_error(hours: int, floor: float | None) -> ConfigError:
    floor_text = f"{floor:g}" if floor is not None else "the tables' delta.deletedFileRetentionDuration in"
    return ConfigError(
        f"privacy.forget_retention_hours={hours} is below {floor_text} hours and Delta's retention check "
        f"refuses it: raise privacy.forget_retention_hours, or (tests only, no concurrent jobs) set "
        f"spark.conf.{RETENTION_CHECK}=false"
    )


def _delete_quarantine_by_raw_id(tables: Tables, raw_id: str) -> int:
    """Delete quarantine rows whose raw text holds the raw id, whatever their user_key.

    A DELETE would write its predicate, raw id included, into the Delta log; the
    MERGE's condition only compares columns with the matching rows themselves.
    """
    matches = tables.read(QUARANTINE).where(holds_raw_id(F.col("raw"), raw_id)).select("raw", "user_key").distinct()
    if matches.isEmpty():
        return 0
    with tables.tagged_commit() as token:
        (
            tables.delta(QUARANTINE)
            .alias("t")
            .merge(matches.alias("s"), "t.raw = s.raw AND t.user_key <=> s.user_key")
            .whenMatchedDelete()
            .execute()
        )
    return tables.commit_metric(QUARANTINE, token, "numTargetRowsDeleted")


def _purge(tables: Tables, name: str, detail: _Detail, hours: int) -> None:
    started = time.perf_counter()
    if detail.deletion_vectors:
        # a deletion vector only marks rows deleted; PURGE rewrites the files without them
        tables.spark.sql(f"REORG TABLE {tables.sql_name(name)} APPLY (PURGE)")
        log.info("forget: %-18s deletion vectors purged (REORG)", name)
    try:
        # LITE finds the removed files (data, change data, deletion vectors) in the Delta log
        # instead of listing the whole table folder
        with _retention_refusal(hours, detail):
            tables.spark.sql(f"VACUUM {tables.sql_name(name)} LITE RETAIN {hours} HOURS")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - older Delta, or a log cleaned up since the last VACUUM
        log.info("forget: %-18s VACUUM LITE not possible (%s); full VACUUM", name, first_line(exc)[:160])
        with _retention_refusal(hours, detail):
            tables.delta(name).vacuum(float(hours))
    log.info("forget: %-18s vacuumed, retention %d h (%.1f s)", name, hours, time.perf_counter() - started)


@contextmanager
def _retention_refusal(hours: int, detail: _Detail) -> Iterator[None]:
    """Delta's retention safety check, as one line naming the keys to change."""
    from pyspark.errors import IllegalArgumentException

    try:
        yield
    except IllegalArgumentException as exc:
        if "retention" not in str(exc).lower():
            raise
        raise _retention_error(hours, file_retention_hours(detail.properties)) from None


def _audit(tables: Tables, run: StageRun, user_key: str, rows_found: int, counts: dict[str, int], purged: bool) -> None:
    requested_at = run.started_at if run.started_at.tzinfo else run.started_at.replace(tzinfo=dt.timezone.utc)
    row = (user_key, requested_at, rows_found, json.dumps(counts, sort_keys=True), purged, run.run_id)
    tables.merge("forget_log", tables.spark.createDataFrame([row], table_schema("forget_log")))


# --------------------------------------------------------------------------
# training snapshots (Parquet, written by the train stage)
# --------------------------------------------------------------------------
def forget_in_snapshots(root: str, user_key: str) -> tuple[list[str], int]:
    """Rewrite every ``<root>/*/split=*/part-*.parquet`` holding ``user_key`` without its rows.

    Returns (files rewritten, rows removed). Only the user_key column is read
    to decide; a file is replaced by a complete new one (temp file, then move).
    """
    import pyarrow.compute as pc
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, base = _fs(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    parts = sorted(i.path for i in infos if i.type == pafs.FileType.File and _is_snapshot_part(base, i.path))
    rewritten: list[str] = []
    removed = 0
    for path in parts:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            if "user_key" not in parquet.schema_arrow.names:
                log.warning("forget: snapshot file without a user_key column left as is: %s", path)
                continue
            keys = parquet.read(columns=["user_key"]).column("user_key")
            hits = pc.sum(pc.equal(keys, user_key)).as_py() or 0
            if not hits:
                continue
            table = parquet.read()  # this file's columns only (no split= column from the path)
        kept = table.filter(pc.fill_null(pc.not_equal(table.column("user_key"), user_key), True))
        folder, file_name = path.rsplit("/", 1)
        tmp = f"{folder}/.forget-{uuid.uuid4().hex}.tmp"  # hidden: readers skip it if we stop midway
        with fs.open_output_stream(tmp) as out:
            pq.write_table(kept, out, compression="snappy")
        fs.move(tmp, path)
        # Hadoop's local file system keeps a checksum beside each file; a stale one breaks reads
        checksum = f"{folder}/.{file_name}.crc"
        if fs.get_file_info(checksum).type == pafs.FileType.File:
            fs.delete_file(checksum)
        removed += hits
        rewritten.append(path)
    if parts:
        log.info(
            "forget: %-18s %d row(s) removed from %d of %d file(s)", SNAPSHOTS, removed, len(rewritten), len(parts)
        )
    return rewritten, removed


def _is_snapshot_part(base: str, path: str) -> bool:
    relative = path[len(base.rstrip("/")) + 1 :].split("/")
    return (
        len(relative) == 3
        and relative[1].startswith("split=")
        and relative[2].startswith("part-")
        and relative[2].endswith(".parquet")
    )


def _fs(uri: str) -> tuple[Any, str]:
    import os

    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)
