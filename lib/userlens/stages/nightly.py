"""Nightly: every stage for one as-of date, incrementally, each with its own ``pipeline_runs`` row.

    ingest -> textualize -> embed -> train (when due) -> score -> profile -> quarantine_retention
    -> report -> privacy_check (with nightly.privacy_check)

The as-of date defaults to the newest raw date ingest finds. Every stage is
idempotent for a date (MERGE / replaceWhere on content, incremental by
text_hash and model version), so a failed night is re-run with the same
command and continues correctly, and a second run for the same date changes
no data. Training is due when there is no model, or the newest model's as-of
date is ``train.retrain_days`` or more before this one.

One nightly runs at a time per warehouse: it holds a lease in ``run_locks``
(:class:`userlens.runs.RunLock`). Any other Delta write conflict (a forget
running beside it, say) fails that stage with one line; Delta's optimistic
concurrency leaves every table as the run that committed first wrote it.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from userlens.config import Settings
from userlens.privacy import PseudonymKey
from userlens.runs import run_stage

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def train_due(settings: Settings, as_of: dt.date) -> str | None:
    """Why a model should be trained for ``as_of`` (None: the current one is recent enough)."""
    from userlens.models.predictor import exists, read_json
    from userlens.stages.train import latest_version, models_root

    version = latest_version(settings)
    if version is None:
        return "no model yet"
    metrics = f"{models_root(settings)}/{version}/metrics.json"
    trained = dt.date.fromisoformat(read_json(metrics)["data"]["as_of_date"]) if exists(metrics) else None
    if trained is None or (as_of - trained).days >= settings.train.retrain_days:
        return f"model {version} is from {trained}, {settings.train.retrain_days}+ days before {as_of}"
    return None


@dataclass
class NightlyResult:
    as_of_date: dt.date | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    report: str | None = None


def run_nightly(spark: "SparkSession", settings: Settings, key: PseudonymKey, date: dt.date | None = None,
                report_path: str | None = None) -> NightlyResult:
    """All stages for ``date`` (default: the newest raw date) under the warehouse's nightly run lock
    (a second nightly at the same time fails with one line naming the holder); each stage's result."""
    from userlens.runs import RunLock, new_run_id
    from userlens.tables import Tables

    with RunLock(Tables(spark, settings.storage), "nightly", new_run_id(), settings.nightly.lock_hours):
        return _nightly(spark, settings, key, date, report_path)


def _nightly(spark: "SparkSession", settings: Settings, key: PseudonymKey, date: dt.date | None,
             report_path: str | None) -> NightlyResult:
    from userlens.stages.embed import run_embed
    from userlens.stages.ingest import run_ingest
    from userlens.stages.profile import run_profile
    from userlens.stages.retention import run_quarantine_retention
    from userlens.stages.score import run_score
    from userlens.stages.textualize import run_textualize
    from userlens.stages.train import run_train

    out = NightlyResult()

    def stage(name: str, body: Any) -> Any:
        log.info("nightly: %s", name)
        out.stages[name] = run_stage(name, settings, spark, body)
        return out.stages[name]

    ingest = stage("ingest", lambda run: run_ingest(spark, settings, key, run, date, False))
    as_of = out.as_of_date = date or ingest.as_of_date
    log.info("nightly: as of %s", as_of)
    stage("textualize", lambda run: run_textualize(spark, settings, run, as_of))
    stage("embed", lambda run: run_embed(spark, settings, run, as_of))
    reason = train_due(settings, as_of)
    if reason:
        log.info("nightly: training a model (%s)", reason)
        stage("train", lambda run: run_train(spark, settings, run, as_of))
    else:
        log.info("nightly: the current model is recent enough (train.retrain_days=%d)", settings.train.retrain_days)
    stage("score", lambda run: run_score(spark, settings, run, as_of))
    stage("profile", lambda run: run_profile(spark, settings, run, as_of))
    stage("quarantine_retention", lambda run: run_quarantine_retention(spark, settings, run, as_of))
    if settings.nightly.report:
        from userlens.report import build_report

        report = stage("report", lambda run: build_report(spark, settings, report_path))
        out.report = str(getattr(report, "path", report))
    if settings.nightly.privacy_check:  # last: it scans what every other stage wrote
        from userlens.stages.privacy_check import run_privacy_check

        stage("privacy_check", lambda run: run_privacy_check(spark, settings, run))
    return out
