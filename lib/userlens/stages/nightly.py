"""Nightly: every stage for one as-of date, incrementally, each with its own ``pipeline_runs`` row.

    ingest -> textualize -> embed -> train (when due) -> score -> gate (with gate.enabled) -> profile
    -> quarantine_retention -> report (with nightly.report) -> privacy_check (with nightly.privacy_check)

A night the quality gate refuses publishes nothing: profile and the stages after it are skipped but the
report, which shows the failed check, and the night exits non-zero with the gate's one line.

(the nightly stages of :data:`userlens.stages.STAGES`, in that order; each says when a night skips it).

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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from userlens.artifacts import ModelStore
from userlens.config import Settings
from userlens.privacy import PseudonymKey
from userlens.runs import run_stage

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

# what a night still runs after the quality gate refused it (nothing that publishes; the report shows the
# failed check)
AFTER_A_REFUSAL = ("quarantine_retention", "report", "privacy_check")


def train_due(settings: Settings, as_of: dt.date) -> str | None:
    """Why a model should be trained for ``as_of`` (None: the current one is recent enough)."""
    return ModelStore.of(settings).train_due(as_of, settings.train.retrain_days)


@dataclass
class NightlyResult:
    as_of_date: dt.date | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    report: str | None = None


def run_nightly(
    spark: "SparkSession",
    settings: Settings,
    key: PseudonymKey,
    date: dt.date | None = None,
    report_path: str | None = None,
) -> NightlyResult:
    """All stages for ``date`` (default: the newest raw date) under the warehouse's nightly run lock
    (a second nightly at the same time fails with one line naming the holder); each stage's result."""
    from userlens.runs import RunLock, new_run_id
    from userlens.tables import Tables

    with RunLock(Tables(spark, settings.storage), "nightly", new_run_id(), settings.nightly.lock_hours):
        return _nightly(spark, settings, key, date, report_path)


def _nightly(
    spark: "SparkSession", settings: Settings, key: PseudonymKey, date: dt.date | None, report_path: str | None
) -> NightlyResult:
    """The registry's nightly stages in order; ingest's as-of date is the night's when none is given."""
    from userlens.stages import StageCall, nightly_stages
    from userlens.stages.gate import GateFailed

    out = NightlyResult(as_of_date=date)
    call = StageCall(spark, settings, key, date, {"full": False, "out": report_path})
    refused: GateFailed | None = None
    for stage in nightly_stages():
        skip = stage.nightly_skip(call) if stage.nightly_skip is not None else None
        if refused is not None and stage.name not in AFTER_A_REFUSAL:
            skip = "the quality gate refused the night"
        if skip:
            log.info("nightly: %s skipped: %s", stage.name, skip)
            continue
        log.info("nightly: %s", stage.name)
        try:
            result = out.stages[stage.name] = run_stage(stage.name, settings, spark, lambda run: stage.run(call, run))
        except GateFailed as exc:
            refused = exc  # the report still shows the failed check; then the night fails with it
            continue
        if out.as_of_date is None:  # the first stage (ingest) finds the night's date
            out.as_of_date = result.as_of_date
            call = replace(call, date=out.as_of_date)
            log.info("nightly: as of %s", out.as_of_date)
        if stage.name == "report":
            out.report = str(result.path)
    if refused is not None:
        raise refused
    return out


# what `userlens publish` runs: the night's scores again (with a refused model under --force), the gate, profile
PUBLISH_STAGES = ("score", "gate", "profile")


def run_publish(
    spark: "SparkSession", settings: Settings, date: dt.date | None = None, force: bool = False
) -> NightlyResult:
    """Score, gate and profile for ``date`` under the nightly's run lock: publish a night the gate refused,
    once an operator has looked. ``force``: the refused model (storage.models/REFUSED) is the candidate
    again and the gate's checks are recorded but do not stop the publication."""
    from userlens.runs import RunLock, new_run_id
    from userlens.stages import BY_NAME, StageCall
    from userlens.tables import Tables

    with RunLock(Tables(spark, settings.storage), "nightly", new_run_id(), settings.nightly.lock_hours):
        if force:
            again = ModelStore.of(settings).reconsider()
            if again:
                log.info("publish: model %s, refused by the gate, is the candidate again (--force)", again)
        out = NightlyResult(as_of_date=date)
        call = StageCall(spark, settings, None, date, {"force": force})
        for name in PUBLISH_STAGES:
            stage = BY_NAME[name]
            log.info("publish: %s", name)
            result = out.stages[name] = run_stage(name, settings, spark, lambda run: stage.run(call, run))
            if out.as_of_date is None:
                out.as_of_date = result.as_of_date
                call = replace(call, date=out.as_of_date)
        return out
