"""One ``pipeline_runs`` row per stage run: status, counts, timings, details."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from userlens.errors import first_line

from userlens.tables import Tables, table_schema

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from userlens.config import Settings

R = TypeVar("R")

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus a random suffix."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


@dataclass
class StageRun:
    """Bookkeeping for one stage run; ``record`` writes (MERGEs) its pipeline_runs row."""

    stage: str
    run_id: str
    as_of_date: dt.date | None = None
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    rows_in: int | None = None
    rows_out: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def record(self, tables: Tables, status: str) -> None:
        finished = dt.datetime.now(dt.timezone.utc)
        row = (self.run_id, self.stage, self.as_of_date, status, self.started_at, finished,
               self.rows_in, self.rows_out, json.dumps(self.details, sort_keys=True, default=str))
        df = tables.spark.createDataFrame([row], table_schema("pipeline_runs"))
        tables.merge("pipeline_runs", df)
        log.info("%s %s: %s in %.1fs (rows_in=%s rows_out=%s)", self.stage, self.run_id, status,
                 (finished - self.started_at).total_seconds(), self.rows_in, self.rows_out)




def run_stage(name: str, settings: "Settings", spark: "SparkSession", body: Callable[[StageRun], R]) -> R:
    """Run ``body(run)`` and record its pipeline_runs row, failed or not; the original error is re-raised."""
    run = StageRun(stage=name, run_id=os.environ.get("USERLENS_RUN_ID") or new_run_id())
    tables = Tables(spark, settings.storage)
    try:
        result = body(run)
    except BaseException as exc:
        run.details["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        try:
            run.record(tables, "failed")
        except Exception:  # noqa: BLE001 - the original error is the one to report
            log.debug("could not record the failed run", exc_info=True)
        raise
    run.record(tables, "succeeded")
    return result
