"""Quarantine retention: ``events_quarantine`` rows older than ``privacy.quarantine_retention_days`` go.

A row's age is counted from its ``source_date`` (the raw date it came from), or,
when it has none (undated raw rows, the item catalog), from ``quarantined_at``,
relative to the nightly's as-of date: a row expires when that date is before
``as_of - quarantine_retention_days``. Nothing due: nothing is written (no
Delta commit). Rows deleted: one Delta DELETE, then a VACUUM with the table's
own retention (``delta.deletedFileRetentionDuration``, one week by default), so
the files of the deletes before that go from storage too.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark.sql import Column
from pyspark.sql import functions as F

from userlens.config import Settings
from userlens.runs import RunRecord, StageRun
from userlens.tables import Tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

QUARANTINE = "events_quarantine"


def retention_cutoff(as_of: dt.date, days: int) -> dt.date:
    """The oldest date kept: rows dated before it expire."""
    return as_of - dt.timedelta(days=days)


def quarantine_expired(cutoff: dt.date) -> Column:
    """True for ``events_quarantine`` rows dated (source_date, else quarantined_at) before ``cutoff``."""
    return F.coalesce(F.col("source_date"), F.to_date("quarantined_at")) < F.lit(cutoff)


@dataclass(frozen=True)
class RetentionResult:
    as_of_date: dt.date
    cutoff: dt.date
    deleted: int
    kept: int
    retention_days: int | None = None

    def run_record(self) -> RunRecord:
        return RunRecord(
            self.deleted + self.kept,
            self.kept,
            {
                "retention_days": self.retention_days,
                "cutoff": self.cutoff.isoformat(),
                "deleted": self.deleted,
                "kept": self.kept,
            },
        )


def run_quarantine_retention(
    spark: "SparkSession", settings: Settings, run: StageRun, as_of: dt.date
) -> RetentionResult:
    """Delete the quarantine rows that have outlived ``privacy.quarantine_retention_days`` as of ``as_of``."""
    days = settings.privacy.quarantine_retention_days
    cutoff = retention_cutoff(as_of, days)
    run.as_of_date = as_of
    tables = Tables(spark, settings.storage)
    deleted = kept = 0
    if tables.exists(QUARANTINE):
        counts = (
            tables.read(QUARANTINE)
            .agg(F.count(F.lit(1)).alias("rows"), F.count(F.when(quarantine_expired(cutoff), 1)).alias("due"))
            .first()
        )
        assert counts is not None  # an aggregate without groupBy has one row
        due = counts["due"]
        if due:
            deleted = tables.delete(QUARANTINE, quarantine_expired(cutoff))
            tables.delta(QUARANTINE).vacuum()  # the table's own retention: never refused by Delta's check
        kept = counts["rows"] - deleted
    log.info(
        "quarantine_retention: %d row(s) dated before %s deleted (privacy.quarantine_retention_days=%d), %d kept",
        deleted,
        cutoff,
        days,
        kept,
    )
    return RetentionResult(as_of, cutoff, deleted, kept, days)
