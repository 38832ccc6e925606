"""One ``pipeline_runs`` row per stage run: status, counts, timings, details."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from userlens.errors import ConcurrentRunError, UserlensError, first_line
from userlens.progress import spark_progress
from userlens.tables import Tables, table_schema

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from userlens.config import Settings

R = TypeVar("R")

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus a random suffix."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class RunRecord:
    """What a stage's result puts on its pipeline_runs row: the counts and the details (JSON)."""

    rows_in: int | None = None
    rows_out: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Recorded(Protocol):
    """A stage result (or a stage's error) that says what its pipeline_runs row holds."""

    def run_record(self) -> RunRecord: ...


@dataclass
class StageRun:
    """Bookkeeping for one stage run; ``record`` writes (MERGEs) its pipeline_runs row. A runner sets
    ``as_of_date`` as soon as it knows it (a failed run's row has it too); the counts and details come
    from its result (or its error), once, in :func:`run_stage`."""

    stage: str
    run_id: str
    as_of_date: dt.date | None = None
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    rows_in: int | None = None
    rows_out: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def _row_exists(self, tables: Tables) -> bool:
        from pyspark.sql import functions as F

        return (
            not tables.read("pipeline_runs")
            .where((F.col("run_id") == self.run_id) & (F.col("stage") == self.stage))
            .isEmpty()
        )

    def take(self, outcome: object) -> None:
        """The counts and details of a :class:`Recorded` result (or error), or what a
        :class:`UserlensError` knew when it was raised, onto this run."""
        if isinstance(outcome, Recorded):
            record = outcome.run_record()
            self.rows_in, self.rows_out = record.rows_in, record.rows_out
            self.details.update(record.details)
        elif isinstance(outcome, UserlensError):
            self.rows_in = outcome.rows_in
            self.details.update(outcome.details)

    def record(self, tables: Tables | None, status: str) -> None:
        """Write the run's ``pipeline_runs`` row (``tables`` None: only the log line)."""
        finished = dt.datetime.now(dt.timezone.utc)
        if tables is not None:
            self._write(tables, status, finished)
        counts = ", ".join(
            f"{value:,} rows {side}"
            for side, value in (("in", self.rows_in), ("out", self.rows_out))
            if value is not None
        )
        log.info(
            "%-20s %s in %5.1f s%s  (run %s)",
            f"{self.stage}:",
            status,
            (finished - self.started_at).total_seconds(),
            f", {counts}" if counts else "",
            self.run_id,
        )

    def _write(self, tables: Tables, status: str, finished: dt.datetime) -> None:
        row = (
            self.run_id,
            self.stage,
            self.as_of_date,
            status,
            self.started_at,
            finished,
            self.rows_in,
            self.rows_out,
            json.dumps(self.details, sort_keys=True, default=str),
        )
        df = tables.spark.createDataFrame([row], table_schema("pipeline_runs"))
        if self._row_exists(tables):
            tables.merge("pipeline_runs", df)  # a retried task with the same run id updates its row
        else:
            tables.append("pipeline_runs", df)  # the usual case: a few Spark jobs fewer than a MERGE


# Delta's optimistic-concurrency failures (delta.exceptions): another writer committed first
DELTA_CONFLICTS = frozenset(
    {
        "ConcurrentAppendException",
        "ConcurrentDeleteReadException",
        "ConcurrentDeleteDeleteException",
        "ConcurrentTransactionException",
        "ConcurrentWriteException",
        "MetadataChangedException",
        "ProtocolChangedException",
        "DeltaConcurrentModificationException",
    }
)


def delta_conflict_name(exc: BaseException) -> str | None:
    """The Delta conflict's class name when ``exc`` is one (converted by delta.exceptions, or a raw
    Py4JJavaError, as the DeltaTable builders raise), else None."""
    for c in type(exc).__mro__:
        if c.__name__ in DELTA_CONFLICTS and c.__module__.startswith("delta."):
            return c.__name__
    java = getattr(exc, "java_exception", None)
    if java is not None:
        try:
            name = str(java.getClass().getName())
        except Exception:  # noqa: BLE001 - the JVM may be gone; then it is not a conflict we can name
            return None
        short = name.rsplit(".", 1)[-1]
        if short in DELTA_CONFLICTS and ".delta." in f".{name}":
            return short
    return None


def is_delta_conflict(exc: BaseException) -> bool:
    return delta_conflict_name(exc) is not None


def conflict_error(what: str, exc: BaseException) -> ConcurrentRunError:
    return ConcurrentRunError(
        f"{what}: another run wrote the same Delta table at the same time and committed first "
        f"(Delta {delta_conflict_name(exc)}); this write was not committed and the table is as the "
        "other run left it: run the command again when the other run has finished"
    )


def run_stage(
    name: str, settings: "Settings", spark: "SparkSession", body: Callable[[StageRun], R], record: bool = True
) -> R:
    """Run ``body(run)`` and record its pipeline_runs row, failed or not, from what the result (or the
    error) reports (:class:`Recorded`); the original error is re-raised (a Delta write conflict with
    another run as one :class:`ConcurrentRunError` line). ``record`` false: the run's log line only, the
    warehouse untouched."""
    run = StageRun(stage=name, run_id=os.environ.get("USERLENS_RUN_ID") or new_run_id())
    tables = Tables(spark, settings.storage) if record else None
    try:
        with spark_progress(spark, name):
            result = body(run)
    except BaseException as exc:
        run.take(exc)
        run.details["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        try:
            run.record(tables, "failed")
        except Exception:  # noqa: BLE001 - the original error is the one to report
            log.debug("could not record the failed run", exc_info=True)
        if is_delta_conflict(exc):
            raise conflict_error(name, exc) from exc
        raise
    run.take(result)
    run.record(tables, "succeeded")
    return result


class RunLock:
    """A lease on the warehouse for one kind of run (``nightly``), in the ``run_locks`` Delta table.

    Acquiring is one MERGE that inserts the lock row, or takes it over when the holder's lease has
    expired; two runs that try at once are ordered by Delta's optimistic concurrency (the loser gets a
    conflict). The loser, and any run that finds a live lease, fails with one line naming the holder.
    The row is deleted on release; a run that dies keeps the lease until ``expires_at``."""

    def __init__(self, tables: Tables, name: str, run_id: str, lease_hours: float) -> None:
        self.tables, self.name, self.run_id, self.lease_hours = tables, name, run_id, lease_hours
        self.holder = f"{socket.gethostname()}:{os.getpid()}"

    def acquire(self) -> None:
        from pyspark.sql import functions as F

        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        row = (self.name, self.run_id, self.holder, now, now + dt.timedelta(hours=self.lease_hours))
        source = self.tables.spark.createDataFrame([row], table_schema("run_locks"))
        try:
            (
                self.tables.delta("run_locks")
                .alias("t")
                .merge(source.alias("s"), "t.name = s.name")
                .whenMatchedUpdateAll(condition="t.expires_at < s.acquired_at")
                .whenNotMatchedInsertAll()
                .execute()
            )
        except Exception as exc:
            if is_delta_conflict(exc):
                raise ConcurrentRunError(
                    f"another {self.name} run took the warehouse's run lock at the same "
                    f"moment (Delta {delta_conflict_name(exc)}); this run did nothing"
                ) from exc
            raise
        held = self.tables.read("run_locks").where(F.col("name") == self.name).first()
        if held is None or held["run_id"] != self.run_id:
            until = held["expires_at"] if held else "?"
            raise ConcurrentRunError(
                f"another {self.name} run ({held['run_id'] if held else '?'} on {held['holder'] if held else '?'}, "
                f"started {held['acquired_at'] if held else '?'} UTC) holds the warehouse's run lock until "
                f"{until} UTC; this run did nothing. If that run died, delete its row from run_locks or wait"
            )
        log.info("%s: run lock taken by %s (%s)", self.name, self.run_id, self.holder)

    def release(self) -> None:
        self.tables.delta("run_locks").delete(f"name = '{self.name}' AND run_id = '{self.run_id}'")

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never hide the run's own error; the lease expires anyway
            log.warning("%s: could not release the run lock of %s", self.name, self.run_id, exc_info=True)
