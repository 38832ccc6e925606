"""The pipeline's stages, listed once.

Each :class:`Stage` says its name (``pipeline_runs.stage``, ``notebooks/<name>.py``, the Databricks task
key), its command and help, its options beyond ``--date`` (which are also its notebook widgets), whether it
needs the pseudonymization key, the checks that run before Spark starts, when the nightly skips it, how
its result is summarised in one line, and its runner. The command line (:mod:`userlens.cli`), the
notebooks (:mod:`userlens.notebook`), ``userlens nightly`` (:mod:`userlens.stages.nightly`) and the
report iterate :data:`STAGES`; a test holds ``databricks.yml``'s task chain against it. A new stage is
one entry here and one runner module.

Runners are imported when a stage runs, not when this module is imported: ``import userlens.stages``
stays light (no torch, no encoder).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from userlens.config import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from userlens.privacy import PseudonymKey
    from userlens.runs import StageRun


@dataclass(frozen=True)
class Option:
    """A stage option beyond ``--date``: a command-line flag and a notebook widget of the same name."""

    name: str  # the argparse dest and the widget name
    help: str
    kind: Literal["flag", "text"] = "text"  # flag: --name (widget: a false/true dropdown)
    required: bool = False
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class StageCall:
    """One run of a stage: the session, the settings, the key (stages that pseudonymize), the as-of date
    and the option values (``Option.name`` -> value)."""

    spark: "SparkSession"
    settings: Settings
    key: "PseudonymKey | None" = None
    date: dt.date | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value


@dataclass(frozen=True)
class Stage:
    name: str
    command: str
    help: str
    run: Callable[[StageCall, "StageRun"], Any]
    summary: Callable[[Any], str]
    description: str = ""
    example: str = ""
    date_help: str | None = "as-of date (default: the latest)"  # None: the stage takes no date
    options: tuple[Option, ...] = ()
    needs_key: bool = False
    # what it reads, checked before Spark starts (a missing path fails in a second): the raw source
    # ("events", or "items" too) and the warehouse
    source: Literal["events", "items"] | None = None
    warehouse: bool = True
    # checks of the settings that need no Spark (extras, GPU keys), run before a session exists
    checks: tuple[Callable[[Settings], object], ...] = ()
    # what must exist before the stage runs on its own (a model); in the nightly an earlier stage makes it
    requires: tuple[Callable[[Settings], object], ...] = ()
    # part of `userlens nightly` (in this order); `nightly_skip` says why a night leaves it out (None: run)
    nightly: bool = True
    nightly_skip: Callable[[StageCall], str | None] | None = None
    # a notebook widget that applies nightly_skip when true ("when_due", "when_enabled")
    skip_widget: tuple[str, str] | None = None
    # the as-of date when none is given, found before the run starts (None: the runner's own default);
    # raises UserlensError when there is none to find
    default_date: Callable[[StageCall], dt.date | None] | None = None

    def prepare(self, call: StageCall) -> StageCall:
        """``call`` with the stage's default date filled in (before any write)."""
        if call.date is None and self.default_date is not None:
            return replace(call, date=self.default_date(call))
        return call


# -------------------------------------------------------------------------- runners (imported when run)
def _ingest(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.ingest import run_ingest

    assert call.key is not None  # needs_key: the command line, the notebook and the nightly load it
    return run_ingest(call.spark, call.settings, call.key, run, call.date, bool(call.option("full", False)))


def _textualize(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.textualize import run_textualize

    return run_textualize(call.spark, call.settings, run, call.date)


def _embed(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.embed import run_embed

    return run_embed(call.spark, call.settings, run, call.date)


def _train(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.train import run_train

    return run_train(call.spark, call.settings, run, call.date)


def _score(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.score import run_score

    return run_score(call.spark, call.settings, run, call.date)


def _gate(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.gate import run_gate

    return run_gate(call.spark, call.settings, run, call.date, bool(call.option("force", False)))


def _profile(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.profile import run_profile

    return run_profile(call.spark, call.settings, run, call.date)


def _explain(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.explain import run_explain

    return run_explain(call.spark, call.settings, run, call.date)


def _retention(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.retention import run_quarantine_retention

    assert call.date is not None  # default_date (Stage.prepare), or in the nightly the night's ingest date
    return run_quarantine_retention(call.spark, call.settings, run, call.date)


def _report(call: StageCall, run: "StageRun") -> Any:
    from userlens.report import build_report

    # runs listed in pipeline order: the registry's stages, then the runs that are no stage of it
    order = ("sample", *(stage.name for stage in STAGES), "nightly", "evaluate")
    return build_report(call.spark, call.settings, call.option("out"), order)


def _privacy_check(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.privacy_check import run_privacy_check

    return run_privacy_check(call.spark, call.settings, run, bool(call.option("full", False)))


def _forget(call: StageCall, run: "StageRun") -> Any:
    from userlens.stages.forget import run_forget

    assert call.key is not None  # needs_key: the command line and the notebook load it
    return run_forget(call.spark, call.settings, call.key, call.option("user_id"), run)


# -------------------------------------------------------------------------- checks before Spark
def check_train(settings: Settings) -> None:
    from userlens.stages.train import check_train_settings

    check_train_settings(settings)


def check_model(settings: Settings) -> None:
    from userlens.stages.score import require_model

    require_model(settings)


# -------------------------------------------------------------------------- when a night skips a stage
def train_not_due(call: StageCall) -> str | None:
    """None when a model should be trained for the as-of date (default: the latest event date), else why
    not: the newest model is less than ``train.retrain_days`` old."""
    from pyspark.sql import functions as F

    from userlens.artifacts import ModelStore
    from userlens.tables import Tables

    as_of = call.date
    if as_of is None:
        tables = Tables(call.spark, call.settings.storage)
        if not tables.exists("events"):
            return None  # the train stage says what is missing
        max_row = tables.read("events").agg(F.max("event_date")).first()
        assert max_row is not None  # an aggregate without groupBy has one row
        as_of = max_row[0]
    if as_of is None or ModelStore.of(call.settings).train_due(as_of, call.settings.train.retrain_days):
        return None
    return f"the newest model is recent enough for {as_of} (train.retrain_days={call.settings.train.retrain_days})"


def newest_ingest_date(call: StageCall) -> dt.date:
    """The as-of date of the newest succeeded ingest run (in a job: this run's ingest task)."""
    from pyspark.sql import functions as F

    from userlens.errors import NoDateError
    from userlens.tables import Tables

    tables = Tables(call.spark, call.settings.storage)
    as_of = None
    if tables.exists("pipeline_runs"):
        ingests = tables.read("pipeline_runs").where(
            (F.col("stage") == "ingest") & (F.col("status") == "succeeded") & F.col("as_of_date").isNotNull()
        )
        max_row = ingests.agg(F.max_by("as_of_date", "finished_at")).first()
        assert max_row is not None  # an aggregate without groupBy has one row
        as_of = max_row[0]
    if as_of is None:
        raise NoDateError(
            "quarantine_retention", "pipeline_runs has no succeeded ingest run to take the as-of date from"
        )
    return as_of


def _switched_off(key: str) -> Callable[[StageCall], str | None]:
    def skip(call: StageCall) -> str | None:
        return None if getattr(call.settings.nightly, key) else f"nightly.{key} is false"

    return skip


def _explain_off(call: StageCall) -> str | None:
    return "explain.users is none" if call.settings.explain.users == "none" else None


def _switched_off_gate(call: StageCall) -> str | None:
    return None if call.settings.gate.enabled else "gate.enabled is false"


# -------------------------------------------------------------------------- summaries (one line each)
def _summary(name: str) -> Callable[[Any], str]:
    def summary(result: Any) -> str:
        from userlens.stages import summaries

        return getattr(summaries, name)(result)

    return summary


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        "ingest",
        "raw logs -> events, events_quarantine, items",
        _ingest,
        _summary("ingest"),
        description="Validate, pseudonymize and PII-scrub raw events; refused rows go to events_quarantine.",
        example="userlens ingest --date 2026-10-30",
        date_help="ingest raw dates up to this one (default: the latest)",
        options=(Option("full", "re-ingest every raw date", "flag"),),
        needs_key=True,
        source="items",
        warehouse=False,
    ),
    Stage(
        "textualize",
        "textualize",
        "events -> one text per user (user_texts)",
        _textualize,
        _summary("textualize"),
        example="userlens textualize --date 2026-10-30",
        date_help="as-of date (default: the latest event date)",
    ),
    Stage(
        "embed",
        "embed",
        "user_texts, items -> user_embeddings, item_embeddings",
        _embed,
        _summary("embed"),
        example="userlens embed --set embed.device=cuda",
        date_help="as-of date of the texts (default: the latest)",
    ),
    Stage(
        "train",
        "train",
        "point-in-time labels -> TorchDistributor -> model",
        _train,
        _summary("train"),
        example="userlens train --date 2026-10-30 --set train.epochs=20",
        date_help="as-of date; the cutoff is date - train.horizon_days (default: the latest event date)",
        checks=(check_train,),
        nightly_skip=train_not_due,
        skip_widget=(
            "when_due",
            "Train only when due: no model yet, or the newest is train.retrain_days old (as nightly)",
        ),
    ),
    Stage(
        "score",
        "score",
        "the latest model over changed users -> user_scores",
        _score,
        _summary("score"),
        example="userlens score",
        date_help="as-of date (default: the newest embedding date)",
        requires=(check_model,),
    ),
    Stage(
        "gate",
        "gate",
        "check the night's scores and any new model against the last published version",
        _gate,
        _summary("gate"),
        description="The quality gate before profile: a new model's test metrics, the scores' stability, "
        "segment and recommendation churn, and the night's row counts against the last published version. "
        "Passed: the new model is published. Failed: exit 1, nothing is published and user_scores is "
        "restored (docs/operations.md).",
        example="userlens gate --date 2026-10-30",
        date_help="as-of date (default: the newest score date)",
        options=(Option("force", "publish even when a check fails (after a look)", "flag"),),
        nightly_skip=_switched_off_gate,
        skip_widget=("when_enabled", "Check only when gate.enabled is true (as nightly)"),
    ),
    Stage(
        "profile",
        "profile",
        "embeddings, scores, segments, interests, RFM -> user_profiles",
        _profile,
        _summary("profile"),
        example="userlens profile",
        date_help="as-of date (default: the newest embedding date)",
    ),
    Stage(
        "explain",
        "explain",
        "the days that moved each score most, for a sample of users -> user_scores.explanations",
        _explain,
        _summary("explain"),
        description="Occlusion over days: each of a user's recent active days is left out of the text and the "
        "features in turn and the score computed again; the days that moved it most are stored with their "
        "weight (explain.users: none, sample or all; docs/operations.md).",
        example="userlens explain --set explain.users=all",
        date_help="as-of date of the scores (default: the newest score date)",
        requires=(check_model,),
        nightly_skip=_explain_off,
        skip_widget=("when_enabled", "Explain only when explain.users is not none (as nightly)"),
    ),
    Stage(
        "quarantine_retention",
        "quarantine-retention",
        "delete events_quarantine rows older than privacy.quarantine_retention_days",
        _retention,
        _summary("quarantine_retention"),
        example="userlens quarantine-retention --date 2026-10-30",
        date_help="as-of date (default: the newest ingest run's)",
        default_date=newest_ingest_date,
    ),
    Stage(
        "report",
        "report",
        "one self-contained HTML report",
        _report,
        _summary("report"),
        example="userlens report --out reports/today.html",
        date_help=None,
        options=(Option("out", "output file (default: nightly.report_dir)", metavar="FILE.html"),),
        nightly_skip=_switched_off("report"),
        skip_widget=("when_enabled", "Write only when nightly.report is true (as nightly)"),
    ),
    Stage(
        "privacy_check",
        "privacy-check",
        "scan every table for raw user ids and PII; a pass/fail table (exit 1 on fail)",
        _privacy_check,
        _summary("privacy_check"),
        example="userlens privacy-check --full",
        date_help=None,
        source="events",
        options=(
            Option(
                "full",
                "scan every row, not only the rows added since the last passing check "
                "(see privacy.check_full_every_days)",
                "flag",
            ),
        ),
        nightly_skip=_switched_off("privacy_check"),
        skip_widget=("when_enabled", "Check only when nightly.privacy_check is true (as nightly)"),
    ),
    Stage(
        "forget",
        "forget",
        "delete one person from every table (erasure)",
        _forget,
        _summary("forget"),
        example="userlens forget --user-id cust-1234",
        date_help=None,
        options=(Option("user_id", "the raw user id as it appears in the source logs", required=True),),
        needs_key=True,
        nightly=False,
    ),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
BY_COMMAND: dict[str, Stage] = {s.command: s for s in STAGES}


def nightly_stages() -> tuple[Stage, ...]:
    """The stages of ``userlens nightly``, in order."""
    return tuple(s for s in STAGES if s.nightly)


def check_nightly_settings(settings: Settings) -> None:
    """The checks of every nightly stage's settings (extras, GPU keys), before Spark starts."""
    for stage in nightly_stages():
        for check in stage.checks:
            check(settings)
