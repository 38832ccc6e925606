"""A progress bar over a stage's Spark work, for people at a terminal.

Spark's own console progress (``[Stage 3:=====>  (12 + 2) / 40]``) is off in userlens' sessions: it is glued
to log lines when output goes to a file and says nothing of which step it belongs to. Instead, while a stage
runs, a daemon thread reads Spark's status tracker (the driver's own bookkeeping; no job of its own) every
half second and draws one tqdm bar of the stage's tasks, done of known, with rate and ETA; log lines print
above it (tqdm's logging redirect). The bar is drawn only on a terminal, never with ``--quiet`` or
``--log-format json`` (:func:`configure`), so files, schedulers and tests see the log lines only.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

_enabled: bool | None = None  # None: draw when stderr is a terminal


def configure(enabled: bool | None) -> None:
    """True / False: always / never draw; None: only when stderr is a terminal (the CLI sets it)."""
    global _enabled
    _enabled = enabled


def wanted() -> bool:
    return _enabled if _enabled is not None else sys.stderr.isatty()


def task_counts(sc: "SparkContext", group: str) -> tuple[int, int]:
    """(tasks done, tasks known) over the jobs of ``group`` so far. Every task of a finished job counts as
    done: a stage whose shuffle output an earlier job made is skipped, and never completes a task."""
    tracker = sc.statusTracker()
    done = total = 0
    for job_id in tracker.getJobIdsForGroup(group):
        job = tracker.getJobInfo(job_id)
        if job is None:
            continue
        for stage_id in job.stageIds:
            stage = tracker.getStageInfo(stage_id)
            if stage is None:  # not known yet (or forgotten): its tasks are not counted
                continue
            total += stage.numTasks
            done += stage.numTasks if job.status == "SUCCEEDED" else stage.numCompletedTasks
    return done, total


def _context(spark: "SparkSession") -> "SparkContext | None":
    try:
        return spark.sparkContext
    except Exception:  # noqa: BLE001 - Spark Connect (Databricks shared clusters) has no SparkContext
        return None


class _Poller(threading.Thread):
    def __init__(self, sc: "SparkContext", group: str, bar: Any, interval_s: float) -> None:
        super().__init__(name=f"userlens-progress-{group}", daemon=True)
        self.sc, self.group, self.bar, self.interval_s = sc, group, bar, interval_s
        self.stop = threading.Event()

    def poll(self) -> bool:
        """Draw the counts; True when every known task is done."""
        done, total = task_counts(self.sc, self.group)
        if total != self.bar.total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        return done == total

    def settle(self, timeout_s: float = 2.0) -> None:
        """The final count: the status tracker hears of a job's end from Spark's listener bus, a moment after
        the action returned (longer on a busy driver), so poll until it has, for at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.poll() and time.monotonic() < deadline:
            time.sleep(0.05)  # the poller has stopped: its event is set

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a bar must never fail the stage (e.g. the context is stopping)
                return


@contextmanager
def spark_progress(
    spark: "SparkSession", label: str, file: IO[str] | None = None, interval_s: float = 0.5
) -> Iterator[None]:
    """Unless :func:`wanted`, nothing at all. Otherwise the jobs started inside run under a job group of
    their own (the previous one comes back after) and one bar of their tasks is drawn while they run."""
    sc = _context(spark) if wanted() else None
    if sc is None:
        yield
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    previous = sc.getLocalProperty("spark.jobGroup.id")
    previous_description = sc.getLocalProperty("spark.job.description")
    group = f"userlens-{label}-{uuid.uuid4().hex[:8]}"
    sc.setJobGroup(group, f"userlens {label}")
    try:
        with ExitStack() as stack:
            bar = stack.enter_context(
                tqdm(total=0, desc=label, unit="task", file=file or sys.stderr, leave=False, dynamic_ncols=True)
            )
            stack.enter_context(logging_redirect_tqdm())
            poller = _Poller(sc, group, bar, interval_s)
            poller.start()
            try:
                yield
            finally:
                poller.stop.set()
                poller.join()
                poller.settle()  # the final count, for a bar that is left on screen
    finally:
        sc.setLocalProperty("spark.jobGroup.id", previous)  # type: ignore[arg-type]  # None unsets it
        sc.setLocalProperty("spark.job.description", previous_description)  # type: ignore[arg-type]
