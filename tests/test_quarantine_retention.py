"""Quarantine retention on real Delta: rows older than privacy.quarantine_retention_days before the as-of
date go (by source_date, else quarantined_at); nothing due commits nothing; each run has its pipeline_runs row."""

from __future__ import annotations

import datetime as dt
import json

from conftest import make_settings
from userlens.runs import run_stage
from userlens.stages.retention import run_quarantine_retention
from userlens.tables import Tables, table_schema

AS_OF = dt.date(2026, 10, 31)  # 30 days: rows dated before 2026-10-01 expire
UTC = dt.timezone.utc


def quarantine_row(raw: str, source: str, source_date: dt.date | None, quarantined_at: dt.datetime) -> tuple:
    return (raw, "bad_timestamp", source, "r0", source_date, None, quarantined_at)


ROWS = [
    # by source_date, whenever quarantined
    quarantine_row("old day", "events", dt.date(2026, 9, 30), dt.datetime(2026, 10, 30, tzinfo=UTC)),
    quarantine_row("first kept day", "events", dt.date(2026, 10, 1), dt.datetime(2026, 8, 1, tzinfo=UTC)),
    # undated rows and the item catalog: by quarantined_at
    quarantine_row("undated, old", "events", None, dt.datetime(2026, 9, 30, 23, 59, tzinfo=UTC)),
    quarantine_row("undated, kept", "events", None, dt.datetime(2026, 10, 1, 0, 1, tzinfo=UTC)),
    quarantine_row("old item row", "items", None, dt.datetime(2026, 9, 1, tzinfo=UTC)),
    quarantine_row("new item row", "items", None, dt.datetime(2026, 10, 20, tzinfo=UTC)),
]


def retention(spark, settings, as_of=AS_OF):
    return run_stage(
        "quarantine_retention", settings, spark, lambda run: run_quarantine_retention(spark, settings, run, as_of)
    )


def test_expired_rows_go_and_a_second_run_commits_nothing(spark, tmp_path):
    settings = make_settings(tmp_path)
    assert settings.privacy.quarantine_retention_days == 30  # the default
    tables = Tables(spark, settings.storage)
    tables.overwrite("events_quarantine", spark.createDataFrame(ROWS, table_schema("events_quarantine")))

    first = retention(spark, settings)
    assert (first.cutoff, first.deleted, first.kept) == (dt.date(2026, 10, 1), 3, 3)
    kept = sorted(r["raw"] for r in tables.read("events_quarantine").collect())
    assert kept == ["first kept day", "new item row", "undated, kept"]

    version = tables.delta("events_quarantine").history(1).first()["version"]
    files = set(tables.read("events_quarantine").inputFiles())
    second = retention(spark, settings)
    assert (second.deleted, second.kept) == (0, 3)
    assert tables.delta("events_quarantine").history(1).first()["version"] == version
    assert set(tables.read("events_quarantine").inputFiles()) == files

    runs = tables.read("pipeline_runs").where("stage = 'quarantine_retention'").orderBy("started_at").collect()
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"]
    assert [json.loads(r["details"])["deleted"] for r in runs] == [3, 0]
    assert json.loads(runs[0]["details"])["cutoff"] == "2026-10-01" and runs[0]["as_of_date"] == AS_OF


def test_the_retention_is_configurable(spark, tmp_path):
    settings = make_settings(tmp_path, "privacy.quarantine_retention_days=60")
    tables = Tables(spark, settings.storage)
    tables.overwrite("events_quarantine", spark.createDataFrame(ROWS, table_schema("events_quarantine")))
    result = retention(spark, settings)
    assert (result.cutoff, result.deleted) == (dt.date(2026, 9, 1), 0)  # 2026-09-01 itself is kept


def test_no_quarantine_table_is_no_work(spark, tmp_path):
    settings = make_settings(tmp_path)
    result = retention(spark, settings)
    assert (result.deleted, result.kept) == (0, 0)
    assert not Tables(spark, settings.storage).exists("events_quarantine")
