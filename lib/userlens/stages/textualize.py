"""Textualize: ``events`` (+ ``items``) -> one budgeted, stable text per user in ``user_texts``.

The texts are built by :mod:`userlens.text.user_texts` (its docstring shows one and says how the
budget, the stability and the skew are handled); this runner reads the tables, MERGEs the texts of
the as-of date and counts what changed.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark.sql import functions as F

from userlens.config import Settings
from userlens.runs import RunRecord, StageRun
from userlens.spark import runtime_conf
from userlens.tables import Tables
from userlens.text.user_texts import build_user_texts

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextualizeResult:
    as_of_date: dt.date
    users: int
    texts_inserted: int
    texts_updated: int
    events_missing_item: int
    users_only_quarantined: int
    template_version: str = ""
    language: str = ""

    def run_record(self) -> RunRecord:
        return RunRecord(
            self.users,
            self.texts_inserted + self.texts_updated,
            {
                "users": self.users,
                "inserted": self.texts_inserted,
                "updated": self.texts_updated,
                "events_missing_item": self.events_missing_item,
                "users_only_quarantined": self.users_only_quarantined,
                "template_version": self.template_version,
                "language": self.language,
            },
        )


def run_textualize(
    spark: "SparkSession", settings: Settings, run: StageRun, as_of: dt.date | None = None
) -> TextualizeResult:
    """Write ``user_texts`` for ``as_of`` (default: the latest event date); a rerun changes nothing."""
    from pyspark import StorageLevel

    tables = Tables(spark, settings.storage)
    as_of = tables.as_of_date("events", "event_date", "ingest", as_of)
    events = tables.read("events")
    run.as_of_date = as_of
    texts = build_user_texts(
        events.where(F.col("event_date") <= F.lit(as_of)),
        tables.read("items"),
        settings.textualize,
        settings.ingest.event_types,
        as_of,
    )
    # Sort-based aggregation for the per-user event arrays: its input comes sorted by user_key from the cap's
    # window, so it adds no sort, where the object hash aggregate (past 128 keys) sorts every event again
    # (10% of the stage at 10^6 events: bench/textualize.py).
    with runtime_conf(spark, {"spark.sql.execution.useObjectHashAggregateExec": "false"}):
        texts = texts.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            totals = texts.agg(
                F.count(F.lit(1)).alias("users"), F.coalesce(F.sum("n_missing_items"), F.lit(0)).alias("missing")
            ).first()
            assert totals is not None  # an aggregate without groupBy has one row
            metrics = tables.merge("user_texts", texts, target_filter=f"t.as_of_date = DATE'{as_of.isoformat()}'")
        finally:
            texts.unpersist()
    only_quarantined = _users_only_quarantined(tables, as_of)
    result = TextualizeResult(
        as_of,
        totals["users"],
        metrics.get("numTargetRowsInserted", 0),
        metrics.get("numTargetRowsUpdated", 0),
        totals["missing"],
        only_quarantined,
        settings.textualize.template_version,
        settings.textualize.language,
    )
    log.info(
        "textualize: %d users as of %s (%d new, %d changed texts); %d events with an item missing from "
        "the catalog; %d users with only quarantined rows get no text",
        result.users,
        as_of,
        result.texts_inserted,
        result.texts_updated,
        result.events_missing_item,
        only_quarantined,
    )
    return result


def _users_only_quarantined(tables: Tables, as_of: dt.date) -> int:
    """Users seen only in quarantined rows up to ``as_of``: they get no text, and are counted."""
    if not tables.exists("events_quarantine"):
        return 0
    quarantined = (
        tables.read("events_quarantine")
        .where(
            f"source = 'events' AND user_key IS NOT NULL AND "
            f"(source_date IS NULL OR source_date <= DATE'{as_of.isoformat()}')"
        )
        .select("user_key")
        .distinct()
    )
    with_text = tables.read("user_texts").where(F.col("as_of_date") == F.lit(as_of)).select("user_key")
    return quarantined.join(with_text, "user_key", "left_anti").count()
