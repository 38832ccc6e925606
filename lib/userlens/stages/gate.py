"""Gate: the night's output against the last published version, before profile publishes it.

The nightly runs it between score and profile. Each check compares what the night made with what
``user_profiles`` was last published from (the ``user_scores`` version the last succeeded profile run
read, from its ``pipeline_runs`` row):

* **model** (a new model waits as the candidate, :class:`~userlens.artifacts.ModelStore`): its test AUC
  of each binary task and its test recall@k against the published model's, each recorded in its
  ``metrics.json``. A drop fails when it is larger than ``gate.max_auc_drop`` (recall: the share
  ``gate.max_recall_drop``) *and* than ``gate.min_standard_errors`` standard errors of the difference
  (Hanley & McNeil for AUC, binomial for recall), so a small test split cannot fail a night by chance.
* **psi**: each score's population stability index over every user (each user's newest score), after
  the night against before it, over ten bins at the deciles of the published distribution.
* **segments**: the share of profiled users whose segment the night changes (the published k-means
  model assigns the night's embeddings; skipped on a night profile refits the segments).
* **recommendations**: the share of users whose top 3 recommended items change, when the model did not
  (a new model is judged by its recall@k).
* **rows**: the newest ingest's events per raw date against the median of the ingests before it (up to 7).
* **prices**: the share of the night's purchases without a positive price against the days before.

With a new model the PSI figures are shown but not gated: a retrained model moves its scores by design.

Passed (or ``force``): the candidate model becomes LATEST and the nightly goes on to profile. Failed: the
candidate becomes REFUSED, ``user_scores`` is restored to the published version (Delta RESTORE, only when
nothing but score runs wrote it since), nothing reaches ``user_profiles``, and :class:`GateFailed` carries
every check to the stage's ``pipeline_runs`` row and one line to the console. ``userlens publish --force``
publishes the refused night after a look.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from userlens.artifacts import ModelStore
from userlens.config import GateSettings, Settings
from userlens.errors import UserlensError
from userlens.features import latest_per_user
from userlens.models.tasks import BINARY_TASKS
from userlens.runs import RunRecord, StageRun
from userlens.tables import Tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from userlens.models.contracts import ModelMetrics

log = logging.getLogger(__name__)

SCORES = (("purchase", "purchase_propensity"), ("churn", "churn_risk"))
TOP = 3  # recommendations compared: the first three items
ROW_HISTORY = 7  # ingests (and days of purchases) the night is held against
MIN_PURCHASES = 20  # fewer purchases in the night: too few to judge their prices
RESTORABLE = {"MERGE", "RESTORE"}  # what score (and an earlier gate) write to user_scores

Status = Literal["pass", "fail", "skip", "note"]  # note: measured and shown, not gated


@dataclass(frozen=True)
class Check:
    """One check: its figure against its limit, and one line in words."""

    name: str
    status: Status
    detail: str
    value: float | None = None
    limit: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def line(self) -> str:
        return f"{self.name}: {self.detail}"


@dataclass(frozen=True)
class GateResult:
    as_of_date: dt.date
    checks: tuple[Check, ...]
    forced: bool = False
    candidate: str | None = None  # the new model judged (None: no new model tonight)
    model_version: str | None = None  # LATEST after the gate
    scores_restored_to: int | None = None  # failed: the user_scores version restored
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.failed)

    @property
    def passed(self) -> bool:
        return not self.failed

    def run_record(self) -> RunRecord:
        return RunRecord(
            None,
            None,
            {
                "passed": self.passed,
                "forced": self.forced,
                "failed_checks": [c.name for c in self.failed],
                "checks": [asdict(c) for c in self.checks],
                "candidate": self.candidate,
                "model_version": self.model_version,
                "scores_restored_to": self.scores_restored_to,
                "notes": list(self.notes),
            },
        )


class GateFailed(UserlensError):
    """The quality gate refused the night: the first failed check in the message, every check in details."""

    def __init__(self, result: GateResult) -> None:
        first = result.failed[0]
        more = f" (and {len(result.failed) - 1} more check(s))" if len(result.failed) > 1 else ""
        super().__init__(
            f"gate refused the night of {result.as_of_date}: {first.line()}{more}; user_profiles and the "
            "published model are unchanged. After a look, `userlens publish --force` publishes it",
            details=result.run_record().details,
        )
        self.result = result


# -------------------------------------------------------------------------- statistics (no Spark)
def auc_drop(current: dict[str, Any], new: dict[str, Any]) -> tuple[float, float] | None:
    """(current AUC - new AUC, the standard error of that difference) from two metrics.json task entries;
    None when either lacks an AUC. The two test splits are independent users of different dates."""
    from userlens.models.metrics import roc_auc_se

    def auc_se(m: dict[str, Any]) -> tuple[float, float] | None:
        auc, n, pos = m.get("auc"), m.get("n"), m.get("positives")
        if auc is None or n is None or pos is None or (isinstance(auc, float) and math.isnan(auc)):
            return None
        return float(auc), roc_auc_se(float(auc), int(pos), int(n) - int(pos))

    a, b = auc_se(current), auc_se(new)
    if a is None or b is None:
        return None
    return a[0] - b[0], math.hypot(a[1], b[1])


def recall_drop(current: dict[str, Any], new: dict[str, Any], k: int) -> tuple[float, float, float] | None:
    """(current recall@k, new recall@k, the standard error of their difference); a user's recall is in
    [0, 1], so sqrt(r (1 - r) / users) bounds each side's standard error. None without both."""
    key = f"recall@{k}"
    if key not in current or key not in new or not current.get("users") or not new.get("users"):
        return None
    r0, r1 = float(current[key]), float(new[key])
    se = math.hypot(math.sqrt(r0 * (1 - r0) / current["users"]), math.sqrt(r1 * (1 - r1) / new["users"]))
    return r0, r1, se


def model_checks(current: "ModelMetrics | None", new: "ModelMetrics | None", gate: GateSettings, k: int) -> list[Check]:
    """The new model's test metrics against the published model's."""
    if new is None:
        return [Check("model", "skip", "no new model tonight")]
    if current is None:
        return [Check("model", "skip", "no published model to compare with")]
    checks = []
    z = gate.min_standard_errors
    for task in BINARY_TASKS:
        found = auc_drop(current.model.get(task, {}), new.model.get(task, {}))
        if found is None:
            continue
        drop, se = found
        now = new.model[task]["auc"]
        was = current.model[task]["auc"]
        failed = drop > gate.max_auc_drop and drop > z * se
        checks.append(
            Check(
                f"model.{task}_auc",
                "fail" if failed else "pass",
                f"test AUC {now:.3f} against {was:.3f} for the published model "
                f"(drop {drop:+.3f}, {drop / se if se else 0.0:.1f} SE; limit {gate.max_auc_drop:.3f} and {z:g} SE)",
                value=round(drop, 6),
                limit=gate.max_auc_drop,
            )
        )
    rec = recall_drop(current.model.get("recommend", {}), new.model.get("recommend", {}), k)
    if rec is not None:
        r0, r1, se = rec
        drop = r0 - r1
        share = drop / r0 if r0 > 0 else 0.0
        failed = share > gate.max_recall_drop and drop > z * se
        checks.append(
            Check(
                "model.recall",
                "fail" if failed else "pass",
                f"test recall@{k} {r1:.3f} against {r0:.3f} ({-share:+.0%}, {drop / se if se else 0.0:.1f} SE; limit "
                f"-{gate.max_recall_drop:.0%} and {z:g} SE)",
                value=round(share, 6),
                limit=gate.max_recall_drop,
            )
        )
    return checks or [Check("model", "skip", "the models share no metric to compare")]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def rows_check(ingests: list[tuple[int, int]], gate: GateSettings) -> Check:
    """``ingests``: (events written, raw dates read) of succeeded ingest runs, newest first."""
    with_dates = [(rows, dates) for rows, dates in ingests if dates > 0]
    if not ingests or ingests[0][1] == 0:
        return Check("rows", "skip", "the newest ingest read no new raw date")
    earlier = [rows / dates for rows, dates in with_dates[1 : 1 + ROW_HISTORY]]
    if not earlier:
        return Check("rows", "skip", "no earlier ingest to compare with")
    rows, dates = with_dates[0]
    now, usual = rows / dates, median(earlier)
    ratio = now / usual if usual > 0 else math.inf
    failed = not (gate.min_rows_ratio <= ratio <= gate.max_rows_ratio)
    return Check(
        "rows",
        "fail" if failed else "pass",
        f"{now:,.0f} events per raw date against a median of {usual:,.0f} over the last {len(earlier)} ingest(s) "
        f"({ratio:.2f}x; allowed {gate.min_rows_ratio:g}x to {gate.max_rows_ratio:g}x)",
        value=round(ratio, 6),
        limit=gate.min_rows_ratio if ratio < gate.min_rows_ratio else gate.max_rows_ratio,
    )


# -------------------------------------------------------------------------- checks on the tables (Spark)
def psi_checks(before: DataFrame, after: DataFrame, gate: GateSettings, new_model: bool = False) -> list[Check]:
    """Each score's PSI over ten bins at the deciles of ``before`` (every user's newest score there). With a
    ``new_model`` the figures are notes: a retrained model moves its scores by design (a legitimate retrain
    of the sample moves purchase propensity by a PSI of 0.7), and its test metrics are its check."""
    from userlens.models.metrics import population_stability_index

    checks = []
    for task, column in SCORES:
        edges_row = before.agg(F.percentile_approx(column, [i / 10 for i in range(1, 10)], 10_000).alias("q")).first()
        edges = sorted(set(edges_row["q"] or [])) if edges_row is not None else []
        if not edges:
            checks.append(Check(f"psi.{column}", "skip", "no published scores"))
            continue

        def binned(df: DataFrame) -> list[float]:
            index = F.lit(0)
            for e in edges:
                index = index + (F.col(column) > F.lit(e)).cast("int")
            counts: dict[int, int] = {
                int(r["b"]): int(r["count"])
                for r in df.where(F.col(column).isNotNull()).groupBy(index.alias("b")).count().collect()
            }
            return [float(counts.get(b, 0)) for b in range(len(edges) + 1)]

        psi = population_stability_index(binned(before), binned(after))
        status: Status = "note" if new_model else ("fail" if psi > gate.max_psi else "pass")
        checks.append(
            Check(
                f"psi.{column}",
                status,
                f"{task} scores' PSI {psi:.3f} against the published ones "
                + ("(a new model: shown, not gated)" if new_model else f"(limit {gate.max_psi:g})"),
                value=round(psi, 6),
                limit=gate.max_psi,
            )
        )
    return checks


def recommendation_check(before: DataFrame, after: DataFrame, gate: GateSettings) -> Check:
    """The share of users (with recommendations before and after) whose first three items changed."""
    top = lambda c: F.slice(F.col(c), 1, TOP)  # noqa: E731
    pairs = before.select("user_key", F.col("recommended_items").alias("b")).join(
        after.select("user_key", F.col("recommended_items").alias("a")), "user_key"
    )
    row = (
        pairs.where(F.col("a").isNotNull() & F.col("b").isNotNull())
        .agg(F.count(F.lit(1)).alias("n"), F.sum((top("a") != top("b")).cast("int")).alias("changed"))
        .first()
    )
    n = int(row["n"] or 0) if row is not None else 0
    if row is None or n == 0:
        return Check("recommendations", "skip", "no user has recommendations before and after")
    share = int(row["changed"] or 0) / n
    return Check(
        "recommendations",
        "fail" if share > gate.max_recommendations_changed else "pass",
        f"{share:.1%} of {n:,} users' top {TOP} recommendations changed with the same model "
        f"(limit {gate.max_recommendations_changed:.0%})",
        value=round(share, 6),
        limit=gate.max_recommendations_changed,
    )


def segment_check(spark: "SparkSession", settings: Settings, tables: Tables, as_of: dt.date) -> Check:
    """The share of profiled users that the published segment model puts in another segment tonight."""
    from userlens.segments import assign_segments, reusable_segment_model

    if not tables.exists("user_profiles"):
        return Check("segments", "skip", "no profiles published yet")
    embeddings = latest_per_user(
        tables.read("user_embeddings").where(F.col("as_of_date") <= F.lit(as_of)), "as_of_date"
    ).select("user_key", "model_id", "embedding")
    ids = [r[0] for r in embeddings.select("model_id").distinct().limit(2).collect()]
    if len(ids) != 1:
        return Check("segments", "skip", "user_embeddings hold no single encoder's vectors")
    model = reusable_segment_model(settings, ids[0], as_of)
    if model is None:
        return Check("segments", "skip", "profile refits the segments tonight: their ids are not comparable")
    published = (
        tables.read("user_profiles")
        .where(F.col("segment_id").isNotNull())
        .select("user_key", F.col("segment_id").alias("was"))
    )
    row = (
        assign_segments(model.model, embeddings.select("user_key", "embedding"))
        .join(published, "user_key")
        .agg(F.count(F.lit(1)).alias("n"), F.sum((F.col("segment_id") != F.col("was")).cast("int")).alias("moved"))
        .first()
    )
    n = int(row["n"] or 0) if row is not None else 0
    if row is None or n == 0:
        return Check("segments", "skip", "no profiled user in a published segment")
    share = int(row["moved"] or 0) / n
    return Check(
        "segments",
        "fail" if share > settings.gate.max_segments_changed else "pass",
        f"{share:.1%} of {n:,} profiled users change segment (limit {settings.gate.max_segments_changed:.0%})",
        value=round(share, 6),
        limit=settings.gate.max_segments_changed,
    )


# -------------------------------------------------------------------------- what was last published
def _succeeded_runs(tables: Tables, stage: str) -> DataFrame:
    return (
        tables.read("pipeline_runs")
        .where((F.col("stage") == stage) & (F.col("status") == "succeeded"))
        .orderBy(F.desc("finished_at"))
    )


def published_scores_version(tables: Tables) -> int | None:
    """The ``user_scores`` version the last succeeded profile run published from, or that the explain run
    after it left (None: none recorded)."""
    if not tables.exists("pipeline_runs"):
        return None
    runs = (
        tables.read("pipeline_runs")
        .where(F.col("stage").isin("profile", "explain") & (F.col("status") == "succeeded"))
        .orderBy(F.desc("finished_at"))
    )
    for row in runs.select("details").limit(20).collect():
        version = json.loads(row["details"] or "{}").get("scores_version")
        if version is not None:
            return int(version)
    return None


def ingest_history(tables: Tables) -> list[tuple[int, list[dt.date]]]:
    """(events written, raw dates read) of the newest succeeded ingest runs, newest first (full re-ingests,
    which rewrite every date, left out)."""
    if not tables.exists("pipeline_runs"):
        return []
    rows = _succeeded_runs(tables, "ingest").select("rows_out", "details").limit(4 * ROW_HISTORY).collect()
    out = []
    for r in rows:
        details = json.loads(r["details"] or "{}")
        if details.get("full"):
            continue
        out.append((int(r["rows_out"] or 0), [dt.date.fromisoformat(d) for d in details.get("dates") or []]))
    return out


def prices_check(tables: Tables, night: list[dt.date], gate: GateSettings) -> Check:
    """The share of the night's purchases without a positive price against the median share of the
    ``ROW_HISTORY`` days before it (a feed that lost its price column publishes zero spend)."""
    if not night:
        return Check("prices", "skip", "the newest ingest read no new raw date")
    first, last = min(night), max(night)
    per_day = {
        r["event_date"]: (int(r["n"]), int(r["unpriced"]))
        for r in tables.read("events")
        .where(
            (F.col("event_type") == "purchase")
            & (F.col("event_date") >= F.date_sub(F.lit(first), ROW_HISTORY))
            & (F.col("event_date") <= F.lit(last))
        )
        .groupBy("event_date")
        .agg(
            F.count(F.lit(1)).alias("n"),
            F.sum((F.col("price").isNull() | (F.col("price") <= 0)).cast("int")).alias("unpriced"),
        )
        .collect()
    }
    n = sum(per_day.get(d, (0, 0))[0] for d in night)
    if n < MIN_PURCHASES:
        return Check("prices", "skip", f"{n} purchases in the night, too few to judge their prices")
    share = sum(per_day.get(d, (0, 0))[1] for d in night) / n
    earlier = [u / c for d, (c, u) in per_day.items() if d < first and c > 0]
    if not earlier:
        return Check("prices", "skip", "no purchases in the days before the night to compare with")
    usual = median(earlier)
    increase = share - usual
    return Check(
        "prices",
        "fail" if increase > gate.max_unpriced_increase else "pass",
        f"{share:.1%} of the night's {n:,} purchases have no positive price, against {usual:.1%} on the "
        f"{len(earlier)} days before (limit +{gate.max_unpriced_increase:.0%})",
        value=round(increase, 6),
        limit=gate.max_unpriced_increase,
    )


def restore_scores(tables: Tables, version: int | None) -> tuple[int | None, str | None]:
    """Restore ``user_scores`` to ``version`` when only score runs (MERGE) and earlier restores wrote it
    since: (version restored to, None), or (None, why not)."""
    if version is None:
        return None, "user_scores has no published version recorded to restore"
    current = tables.version("user_scores")
    if current == version:
        return None, None
    since = (
        tables.delta("user_scores").history().where(F.col("version") > version).select("version", "operation").collect()
    )
    other = [(r["version"], r["operation"]) for r in since if r["operation"] not in RESTORABLE]
    if other:
        v, op = other[0]
        return None, (
            f"user_scores not restored: {op} (version {v}) changed it after the published version {version}; "
            "the refused rows stay in user_scores but reach no profile"
        )
    tables.delta("user_scores").restoreToVersion(version)
    return version, None


# -------------------------------------------------------------------------- the stage
def run_gate(
    spark: "SparkSession", settings: Settings, run: StageRun, as_of: dt.date | None = None, force: bool = False
) -> GateResult:
    """Check the night against the last published version; publish the candidate model, or refuse the
    night (:class:`GateFailed`) unless ``force``."""
    tables = Tables(spark, settings.storage)
    as_of = tables.as_of_date("user_scores", "as_of_date", "score", as_of)
    run.as_of_date = as_of
    gate = settings.gate
    store = ModelStore.of(settings)
    candidate, current = store.candidate(), store.latest()
    checks = model_checks(
        store.metrics(current) if current and candidate else None,
        store.metrics(candidate) if candidate else None,
        gate,
        settings.train.recommend.k,
    )
    reference = published_scores_version(tables)
    if reference is None:
        checks.append(Check("psi", "skip", "no published scores recorded yet"))
    else:
        # each user's newest score after the night and as published, computed once for every check below
        # (the PSI of each task and the recommendation churn read them five times)
        wanted = ("user_key", *(column for _, column in SCORES), "recommended_items")
        now = (
            latest_per_user(tables.read("user_scores").where(F.col("as_of_date") <= F.lit(as_of)), "as_of_date")
            .select(*wanted)
            .localCheckpoint()
        )
        before = (
            latest_per_user(
                tables.read_version("user_scores", reference).where(F.col("as_of_date") <= F.lit(as_of)), "as_of_date"
            )
            .select(*wanted)
            .localCheckpoint()
        )
        checks += psi_checks(before, now, gate, new_model=candidate is not None)
        if candidate is None:
            checks.append(recommendation_check(before, now, gate))
    checks.append(segment_check(spark, settings, tables, as_of))
    ingests = ingest_history(tables)
    checks.append(rows_check([(rows, len(dates)) for rows, dates in ingests], gate))
    checks.append(prices_check(tables, ingests[0][1] if ingests else [], gate))
    result = GateResult(as_of, tuple(checks), force, candidate, current)
    for check in checks:
        log.info("gate: %s %s", check.status, check.line())
    if result.passed or force:
        if force and not result.passed:
            log.warning("gate: %d failed check(s) overridden by --force", len(result.failed))
        promoted = store.promote()
        if promoted:
            log.info("gate: model %s published (LATEST)", promoted)
        return replace(result, model_version=promoted or current)
    restored, note = restore_scores(tables, reference)
    refused = store.refuse()
    notes = tuple(n for n in (note, f"model {refused} refused (storage.models/REFUSED)" if refused else None) if n)
    raise GateFailed(replace(result, scores_restored_to=restored, notes=notes))
