"""The HTML report: one self-contained file on the latest model, the scores, segments and runs.

``build_report(spark, settings)`` writes ``<nightly.report_dir>/userlens-report-<as_of>.html``
(or ``out_path``): no external CSS, JS, fonts or images; every plot is a base64 PNG
drawn by matplotlib on its Agg canvas (extra ``report``). Sections:

1. model vs baseline (ROC, reliability and gains curves from the artifact's .npz files,
   metrics, DP, cutoff and split sizes from ``metrics.json``);
2. score distributions (histograms binned in Spark over each user's newest row in
   ``user_scores``: scoring is incremental, so the latest as_of_date alone holds
   only the users rescored that day);
3. segments (published ones with sizes, mean propensity and churn from the profiles of
   the same segment model, and top categories; unpublished ones only as a count,
   whatever the table holds for them);
4. embedding map (2-D PCA of at most 2000 sampled ``user_profiles`` embeddings,
   coloured by segment; no keys or ids leave Spark);
5. recommendation metrics (``metrics.json["recommendations"]``);
6. scores across the last nights (users rescored, mean scores, model version, each
   score's population stability index against the night before);
7. data quality (the last nights' ingest runs side by side: duplicates, quarantined rows
   and each quarantine reason, as shares of the rows read);
8. pipeline runs (each stage's latest run, durations as a bar chart).

A section whose input does not exist yet is replaced by a visible "not available
yet: run ``userlens <stage>``" note. Only aggregates and a bounded sample reach
the driver. Every string that comes from data or config is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from userlens.artifacts import ModelStore
from userlens.config import Settings
from userlens.errors import UserlensError, first_line
from userlens.models.contracts import ModelMetrics
from userlens.models.metrics import population_stability_index
from userlens.models.tasks import BINARY_TASKS, TASKS
from userlens.tables import Tables

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

TASK_ORDER = (*BINARY_TASKS, "next_category")
BINARY_METRICS = (("auc", "AUC"), ("pr_auc", "PR-AUC"), ("log_loss", "log loss"), ("ece", "ECE"))
MULTICLASS_METRICS = (("accuracy", "accuracy"), ("top3_accuracy", "top-3 accuracy"))
LOWER_IS_BETTER = {"log_loss", "ece"}
SCORE_COLUMNS = ("purchase_propensity", "churn_risk")
HISTOGRAM_BINS = 20
EMBEDDING_SAMPLE = 2000

EXTRA = "pip install 'userlens[report]'"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;max-width:980px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}tr.bad td{background:#fde8e8}
.na{color:#8a5a00;background:#fff6e0;padding:.4em .7em;border-left:3px solid #e0a800}
.meta{color:#666}img{max-width:100%;display:block;margin:.5em 0}code{background:#f4f4f4;padding:0 .2em}
""".strip()


@dataclass
class ReportResult:
    """Where the report went, its as-of date, and which sections were rendered or skipped."""

    path: str
    as_of: dt.date
    rendered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _Skip(Exception):
    """A section's input is missing; ``note`` is the (already escaped) HTML shown instead."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


def _not_yet(stage: str, why: str = "") -> _Skip:
    suffix = f" ({html.escape(why)})" if why else ""
    return _Skip(f"not available yet: run <code>userlens {html.escape(stage)}</code>{suffix}")


def build_report(
    spark: "SparkSession", settings: Settings, out_path: str | None = None, stage_order: tuple[str, ...] = ()
) -> ReportResult:
    """Render the report from the tables and the latest model; write it to ``out_path`` (default
    ``<nightly.report_dir>/userlens-report-<as_of>.html``) and return where it went."""
    _require_matplotlib()
    from userlens.models.storage import write_bytes

    context = _Context(spark, settings, stage_order)
    sections = [
        ("model", "Model vs baseline", context.model_section),
        ("scores", "Score distributions", context.scores_section),
        ("segments", "Segments", context.segments_section),
        ("by_group", "Model quality by segment and by activity", context.by_group_section),
        ("embeddings", "Embedding map", context.embeddings_section),
        ("recommendations", "Recommendation metrics", context.recommendations_section),
        ("explanations", "Why these scores: a few users' explanations", context.explanations_section),
        ("trends", "Scores across the last nights", context.trends_section),
        ("quality", "Data quality: the last nights' ingest", context.quality_section),
        ("gate", "Quality gate: the last check before publishing", context.gate_section),
        ("runs", "Pipeline runs", context.runs_section),
    ]
    rendered: list[str] = []
    skipped: list[str] = []
    parts: list[str] = []
    for key, title, render in sections:
        try:
            body = render()
            rendered.append(key)
        except _Skip as skip:
            body = f'<p class="na">{skip.note}</p>'
            skipped.append(key)
            log.info("report: section %s skipped", key)
        parts.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>\n{body}\n</section>')

    as_of = max(context.dates) if context.dates else dt.datetime.now(dt.timezone.utc).date()
    path = out_path or f"{settings.nightly.report_dir.rstrip('/')}/userlens-report-{as_of.isoformat()}.html"
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tables = context.tables
    where = f"{settings.storage.catalog}.{settings.storage.schema_name}" if tables.use_catalog else tables.root
    document = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>userlens report {as_of.isoformat()}</title>",
            f"<style>{STYLE}</style></head><body>",
            f"<h1>userlens report, as of {as_of.isoformat()}</h1>",
            f'<p class="meta">generated {generated}; tables: <code>{html.escape(str(where))}</code>; '
            f"models: <code>{html.escape(str(settings.storage.models))}</code></p>",
            *parts,
            "</body></html>",
            "",
        ]
    )
    if "://" not in path:
        path = os.path.abspath(path)
    write_bytes(path, document.encode("utf-8"))
    log.info("report: %s (%d sections, %d skipped)", path, len(rendered), len(skipped))
    return ReportResult(path, as_of, rendered, skipped)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UserlensError(f"the report needs matplotlib, which is not installed: {EXTRA}") from exc


class _Context:
    """What the sections share: the session, the tables, the model's metrics, dates seen."""

    def __init__(self, spark: "SparkSession", settings: Settings, stage_order: tuple[str, ...] = ()) -> None:
        self.spark = spark
        self.stage_order = stage_order  # the order runs are listed in (the registry's); others after
        self.settings = settings
        self.tables = Tables(spark, settings.storage)
        self.dates: list[dt.date] = []
        self._metrics: tuple[str, str, ModelMetrics] | None = None

    # -- model artifact -----------------------------------------------------------------------
    def model(self) -> tuple[str, str, ModelMetrics]:
        """(version, directory, metrics.json) of the latest model; _Skip when there is none."""
        if self._metrics is None:
            store = ModelStore.of(self.settings)
            version = store.latest()
            if version is None:
                raise _not_yet("train", "no model yet")
            path = store.path(version)
            try:
                metrics = store.metrics(version)
            except (OSError, ValueError) as exc:
                raise _Skip(f"could not read {html.escape(path)}/metrics.json: {html.escape(first_line(exc))}") from exc
            if metrics is None:
                raise _not_yet("train", f"model {version} has no metrics.json")
            self._metrics = (version, path, metrics)
        return self._metrics

    def model_section(self) -> str:
        version, path, metrics = self.model()
        data = metrics.data
        if data.as_of_date:
            self.dates.append(dt.date.fromisoformat(data.as_of_date))
        out = [
            f"<p>model <code>{_e(version)}</code> in <code>{_e(path)}</code>; cutoff "
            f"{_e(data.cutoff or '?')} (as of {_e(data.as_of_date or '?')}, horizon "
            f"{_e(data.horizon_days)} days)</p>"
        ]
        out.append(_splits_table(data.splits))
        out.append(_metrics_table(metrics.model, metrics.baseline))
        heads = metrics.training.baseline_fallback
        fallen_back = sorted(t for t, head in heads.items() if head == "baseline")
        if fallen_back:
            out.append(
                f"<p>the model's {_e(' and '.join(fallen_back))} "
                f"head{'s are' if len(fallen_back) > 1 else ' is'}"
                " the baseline's logistic regression: no trained epoch had a lower validation loss "
                "(train.baseline_fallback), so model and baseline agree there</p>"
            )
        probed = sorted(t for t, head in heads.items() if head == "state probe")
        if probed:
            out.append(
                f"<p>the model's {_e(' and '.join(probed))} head{'s are' if len(probed) > 1 else ' is'} a "
                "logistic regression on the state embedding and the numeric features (train.state_probe): it "
                "had a lower validation loss than every trained epoch and than the baseline's regression</p>"
            )
        dp = metrics.training.dp
        if dp:
            out.append(
                f"<p>trained with DP-SGD: &epsilon; = {_fmt(dp.get('epsilon'))}, "
                f"&delta; = {_fmt(dp.get('delta'))} ({_e(dp.get('unit', 'user'))}-level"
                f"{', noise multiplier ' + _fmt(dp['noise_multiplier']) if 'noise_multiplier' in dp else ''}"
                f"{', max grad norm ' + _fmt(dp['max_grad_norm']) if 'max_grad_norm' in dp else ''})</p>"
            )
        else:
            out.append("<p>trained without differential privacy</p>")
        out.append(self._profiles_privacy())
        out.append(self._curves(path))
        return "\n".join(out)

    def _profiles_privacy(self) -> str:
        """The models behind ``user_profiles`` and their DP, from its table properties (profile stage)."""
        from userlens.privacy import DP_DELTA_PROPERTY, DP_EPSILON_PROPERTY, DP_PROPERTY, MODEL_VERSION_PROPERTY

        props = self.tables.properties("user_profiles")
        if MODEL_VERSION_PROPERTY not in props:
            return ""
        text = f"<p><code>user_profiles</code> hold scores of model <code>{_e(props[MODEL_VERSION_PROPERTY])}</code>"
        if props.get(DP_PROPERTY) == "dp-sgd":
            text += (
                f", trained with DP-SGD: &epsilon; = {_e(props.get(DP_EPSILON_PROPERTY, '?'))}, "
                f"&delta; = {_e(props.get(DP_DELTA_PROPERTY, '?'))}"
            )
        else:
            text += f", differential privacy: {_e(props.get(DP_PROPERTY, 'unknown'))}"
        return text + " (table properties <code>userlens.dp*</code>)</p>"

    def _curves(self, path: str) -> str:
        predictions = {}
        notes = []
        for name, file in (("model", "test_predictions.npz"), ("baseline", "baseline_predictions.npz")):
            try:
                predictions[name] = _load_npz(f"{path}/{file}")
            except FileNotFoundError:
                notes.append(f"{name}: no {file}")
            except (OSError, ValueError) as exc:
                notes.append(f"{name}: could not read {file}: {first_line(exc)}")
        out = [f'<p class="na">{_e("; ".join(notes))}</p>'] if notes else []
        for task in BINARY_TASKS:
            series = {
                name: (arrays[f"{task}.y"], arrays[f"{task}.p"])
                for name, arrays in predictions.items()
                if f"{task}.y" in arrays and f"{task}.p" in arrays
            }
            if series:
                image, problems = _roc_and_calibration(task, series)
                if problems:
                    out.append(f'<p class="na">{_e("; ".join(problems))}</p>')
                if image:
                    out.append(image)
        return "\n".join(out)

    # -- scores -------------------------------------------------------------------------------
    def scores_section(self) -> str:
        from pyspark.sql import functions as F

        if not self.tables.exists("user_scores"):
            raise _not_yet("score", "no user_scores table")
        scores = self.tables.read("user_scores")
        max_row = scores.agg(F.max("as_of_date")).first()
        assert max_row is not None  # an aggregate without groupBy has one row
        latest = max_row[0]
        if latest is None:
            raise _not_yet("score", "user_scores is empty")
        self.dates.append(latest)
        newest = (
            scores.where(F.col("as_of_date") <= F.lit(latest))
            .groupBy("user_key")
            .agg(*[F.max_by(c, "as_of_date").alias(c) for c in SCORE_COLUMNS])
        )
        long = (
            newest.select(
                F.explode(
                    F.array(*[F.struct(F.lit(c).alias("score"), F.col(c).alias("value")) for c in SCORE_COLUMNS])
                ).alias("s")
            )
            .select("s.*")
            .where(F.col("value").isNotNull())
        )
        bucket = F.least(F.greatest(F.floor(F.col("value") * HISTOGRAM_BINS), F.lit(0)), F.lit(HISTOGRAM_BINS - 1))
        rows = (
            long.groupBy("score", bucket.cast("int").alias("bin"))
            .agg(F.count(F.lit(1)).alias("n"), F.sum("value").alias("total"))
            .collect()
        )
        counts = {c: np.zeros(HISTOGRAM_BINS, dtype=np.int64) for c in SCORE_COLUMNS}
        totals = {c: 0.0 for c in SCORE_COLUMNS}
        for row in rows:
            counts[row["score"]][row["bin"]] += row["n"]
            totals[row["score"]] += row["total"]
        if not any(c.sum() for c in counts.values()):
            raise _not_yet("score", "no scores in user_scores")
        summary = "; ".join(
            f"{c}: {int(counts[c].sum()):,} users, mean {_fmt(totals[c] / counts[c].sum())}"
            for c in SCORE_COLUMNS
            if counts[c].sum()
        )
        return f"<p>each user's newest score up to {_e(latest)} ({_e(summary)})</p>\n" + _histograms(counts)

    # -- segments -----------------------------------------------------------------------------
    def segments_section(self) -> str:
        from pyspark.sql import functions as F

        if not self.tables.exists("segments"):
            raise _not_yet("profile", "no segments table")
        segments = self.tables.read("segments")
        max_row = segments.agg(F.max("as_of_date")).first()
        assert max_row is not None  # an aggregate without groupBy has one row
        latest = max_row[0]
        if latest is None:
            raise _not_yet("profile", "segments is empty")
        self.dates.append(latest)
        # one row per segment (k rows), so collecting is fine
        rows = (
            segments.where(F.col("as_of_date") == F.lit(latest))
            .select("segment_id", "users", "published", "top_categories", "model_version")
            .orderBy("segment_id")
            .collect()
        )
        min_size = self.settings.privacy.min_segment_size
        shown = [r for r in rows if r["published"] and r["users"] >= min_size]
        suppressed = len(rows) - len(shown)
        kpis = self._segment_kpis({r["model_version"] for r in shown}, [r["segment_id"] for r in shown])
        table = [
            "<table><tr><th>segment</th><th>users</th><th>mean purchase propensity</th><th>mean churn risk</th>"
            "<th>top categories</th></tr>"
        ]
        for row in shown:
            categories = ", ".join(_e(c) for c in (row["top_categories"] or []))
            purchase, churn = kpis.get(row["segment_id"], (None, None))
            table.append(
                f'<tr><td class="n">{row["segment_id"]}</td><td class="n">{row["users"]:,}</td>'
                f'<td class="n">{_fmt(purchase, 3)}</td><td class="n">{_fmt(churn, 3)}</td>'
                f"<td>{categories}</td></tr>"
            )
        table.append("</table>")
        return (
            f"<p>{len(rows)} segments as of {_e(latest)}: {len(shown)} published, {suppressed} suppressed "
            f"small segment(s) (fewer than privacy.min_segment_size = {min_size} users, not shown)</p>\n"
            + ("\n".join(table) if shown else "")
        )

    def by_group_section(self) -> str:
        """The model's test metrics per published segment and per activity decile (metrics.json by_group)."""
        version, _, metrics = self.model()
        by_group = metrics.by_group
        if not by_group:
            raise _Skip(f"<p>model {_e(version)} was trained before userlens computed quality by group</p>")
        out = [
            "<p>the model's test split, by group of users: AUC (&plusmn; its standard error), calibration "
            "(ECE: the mean gap between predicted and observed rate over ten score bins) and the recommender's "
            "recall; a model that serves heavy users and fails new ones shows here. Groups with fewer than "
            f"privacy.min_segment_size = {self.settings.privacy.min_segment_size} test users are not shown.</p>"
        ]
        titles = {
            "segment": "by published segment (each test user's nearest segment, from the embedding at the cutoff)",
            "activity": "by activity: deciles of the events before the cutoff (fewer groups on a small test split)",
        }
        for view in ("segment", "activity"):
            found = by_group.get(view) or {}
            out.append(f"<h3>{_e(titles[view])}</h3>")
            if "groups" not in found:
                out.append(f"<p>{_e(found.get('note', 'not computed'))}</p>")
                continue
            if "segment_model_version" in found:
                out.append(f"<p>segment model <code>{_e(found['segment_model_version'])}</code></p>")
            out.append(_group_table(found["groups"]))
            if found.get("suppressed"):
                out.append(f"<p>{found['suppressed']} group(s) with fewer test users left out</p>")
        return "\n".join(out)

    # -- embeddings ---------------------------------------------------------------------------
    def _segment_kpis(self, versions: set[str], segment_ids: list[int]) -> dict[int, tuple[float, float]]:
        """Mean purchase propensity and churn risk per published segment, over the profiles that carry the
        segment model's version (segment ids mean nothing across refits); {} without profiles."""
        from pyspark.sql import functions as F

        if not segment_ids or not self.tables.exists("user_profiles"):
            return {}
        rows = (
            self.tables.read("user_profiles")
            .where(F.col("segment_id").isin(segment_ids) & F.col("segment_model_version").isin(sorted(versions)))
            .groupBy("segment_id")
            .agg(F.avg("purchase_propensity").alias("purchase"), F.avg("churn_risk").alias("churn"))
            .collect()
        )
        return {r["segment_id"]: (r["purchase"], r["churn"]) for r in rows}

    def embeddings_section(self) -> str:
        from pyspark.sql import functions as F

        if not self.tables.exists("user_profiles"):
            raise _not_yet("profile", "no user_profiles table")
        # a bounded random sample; only the vector and the segment id reach the driver
        rows = (
            self.tables.read("user_profiles")
            .where(F.col("embedding").isNotNull())
            .select("embedding", "segment_id")
            .orderBy(F.rand(7))
            .limit(EMBEDDING_SAMPLE)
            .collect()
        )
        if rows:
            dims = [len(r["embedding"]) for r in rows]
            dim = max(set(dims), key=dims.count)
            rows = [r for r in rows if len(r["embedding"]) == dim]
        if len(rows) < 3:
            raise _not_yet("profile", f"{len(rows)} user profile(s) with an embedding; the map needs 3")
        x = np.asarray([r["embedding"] for r in rows], dtype=np.float64)
        segment = np.asarray([-1 if r["segment_id"] is None else r["segment_id"] for r in rows])
        projected, explained = _pca_2d(x)
        return (
            f"<p>{len(rows):,} sampled users, first two principal components "
            f"({explained[0]:.0%} and {explained[1]:.0%} of the variance); grey: no published segment</p>\n"
            + _embedding_map(projected, segment)
        )

    # -- recommendations ----------------------------------------------------------------------
    def recommendations_section(self) -> str:
        _, _, metrics = self.model()
        recommendations = metrics.recommendations
        if not isinstance(recommendations, dict) or not recommendations:
            raise _not_yet("train", "the latest model's metrics.json has no recommendation metrics")
        names: list[str] = []
        recommendations = {m: v if isinstance(v, dict) else {} for m, v in recommendations.items()}
        for values in recommendations.values():
            for name in values:
                if name not in names:
                    names.append(name)
        table = ["<table><tr><th>method</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"]
        for method, values in recommendations.items():
            table.append(
                f"<tr><td>{_e(method)}</td>"
                + "".join(f'<td class="n">{_fmt(values.get(n))}</td>' for n in names)
                + "</tr>"
            )
        table.append("</table>")
        return "\n".join(table)

    # -- trends -------------------------------------------------------------------------------
    def trends_section(self, nights: int = 7) -> str:
        """Per as-of date of the last ``nights`` in user_scores: users scored, mean scores, model version(s),
        and the drift of each score's distribution from the night before (population stability index over
        ten bins). Scoring is incremental: each night holds the users rescored that night."""
        from pyspark.sql import functions as F

        if not self.tables.exists("user_scores"):
            raise _not_yet("score", "no user_scores table")
        scores = self.tables.read("user_scores")
        dates = [r[0] for r in scores.select("as_of_date").distinct().orderBy(F.desc("as_of_date")).take(nights)]
        if not dates:
            raise _not_yet("score", "user_scores is empty")
        recent = scores.where(F.col("as_of_date").isin(dates))

        def histogram(c: str) -> Any:  # ten bins of [0, 1]; nulls in none
            bucket = F.least(F.greatest(F.floor(F.col(c) * 10), F.lit(0)), F.lit(9))
            return F.array(*[F.count(F.when(bucket == b, 1)) for b in range(10)]).alias(f"{c}_bins")

        # one pass: counts, means, versions and the histograms the PSI needs, per night
        summary = {
            r["as_of_date"]: r
            for r in recent.groupBy("as_of_date")
            .agg(
                F.count(F.lit(1)).alias("users"),
                *[F.avg(c).alias(c) for c in SCORE_COLUMNS],
                F.array_sort(F.collect_set("model_version")).alias("versions"),
                *[histogram(c) for c in SCORE_COLUMNS],
            )
            .collect()
        }
        bins = {
            (date, c): hist
            for date, r in summary.items()
            for c in SCORE_COLUMNS
            if (hist := np.asarray(r[f"{c}_bins"], dtype=float)).sum()
        }
        head = ["as of", "users scored", *[f"mean {c}" for c in SCORE_COLUMNS]]
        head += [f"{c} PSI vs the night before" for c in SCORE_COLUMNS] + ["model", "model test AUC"]
        store = ModelStore.of(self.settings)
        aucs: dict[str, str] = {}

        def test_auc(version: str) -> str:  # the model's own holdout AUC per binary task, from its metrics.json
            if version not in aucs:
                try:
                    metrics = store.metrics(version)
                except (OSError, ValueError):
                    metrics = None
                found = [metrics.model.get(t, {}).get("auc") for t in BINARY_TASKS] if metrics else []
                known = any(a is not None for a in found)
                aucs[version] = " / ".join(_fmt(a, 3) for a in found) if known else "&ndash;"
            return aucs[version]

        table = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
        ordered = sorted(dates)
        for i, date in enumerate(ordered):
            r = summary[date]
            drift = []
            for c in SCORE_COLUMNS:
                now, before = bins.get((date, c)), bins.get((ordered[i - 1], c)) if i else None
                psi = population_stability_index(before, now) if now is not None and before is not None else None
                drift.append(f'<td class="n">{_fmt(psi, 3)}</td>')
            table.append(
                f'<tr><td>{_e(date)}</td><td class="n">{_fmt(r["users"])}</td>'
                + "".join(f'<td class="n">{_fmt(r[c], 3)}</td>' for c in SCORE_COLUMNS)
                + "".join(drift)
                + f"<td>{_e(', '.join(r['versions']))}</td>"
                + f'<td class="n">{"; ".join(test_auc(v) for v in r["versions"])}</td></tr>'
            )
        table.append("</table>")
        return (
            "<p>each night's rescored users (scoring is incremental). PSI compares a score's distribution over "
            "ten bins with the night before: below 0.1 stable, 0.1 to 0.25 a shift worth a look, above 0.25 a "
            f"shift that needs an explanation. The model's test AUC ({' / '.join(BINARY_TASKS)}) is the one "
            "measured on its holdout when it was trained: a retrain that scores worse shows here</p>\n"
            + "\n".join(table)
        )

    # -- data quality -------------------------------------------------------------------------
    def quality_section(self, nights: int = 7) -> str:
        """The last ``nights`` succeeded ingest runs side by side: rows read, events, duplicates, quarantined
        and each quarantine reason, as a share of the rows read (from their pipeline_runs details)."""
        from pyspark.sql import functions as F

        if not self.tables.exists("pipeline_runs"):
            raise _not_yet("ingest", "no pipeline_runs table")
        rows = (
            self.tables.read("pipeline_runs")
            .where((F.col("stage") == "ingest") & (F.col("status") == "succeeded"))
            .orderBy(F.desc("started_at"))
            .select("as_of_date", "started_at", "rows_in", "rows_out", "details")
            .limit(nights)
            .collect()
        )
        if not rows:
            raise _not_yet("ingest", "no succeeded ingest run in pipeline_runs")
        runs = []
        for row in reversed(rows):  # oldest first
            try:
                details = json.loads(row["details"] or "{}")
            except ValueError:
                details = {}
            runs.append((row, details if isinstance(details, dict) else {}))
        reasons = sorted({r for _, d in runs for r in (d.get("reasons") or {})})
        head = ["ingest run (as of)", "rows read", "events", "duplicates", "quarantined", *reasons]
        table = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
        for row, details in runs:
            read = row["rows_in"] or 0

            def cell(count: Any, read: int = read) -> str:
                if not isinstance(count, int):
                    return '<td class="n">&ndash;</td>'
                share = f" ({100 * count / read:.2f}%)" if read else ""
                return f'<td class="n">{count:,}{share}</td>'

            table.append(
                f"<tr><td>{_e(row['started_at'].strftime('%Y-%m-%d %H:%M'))} ({_e(row['as_of_date'] or '')})</td>"
                f'<td class="n">{_fmt(row["rows_in"])}</td><td class="n">{_fmt(row["rows_out"])}</td>'
                + cell(details.get("duplicates"))
                + cell(details.get("quarantined"))
                + "".join(cell((details.get("reasons") or {}).get(reason, 0)) for reason in reasons)
                + "</tr>"
            )
        table.append("</table>")
        return (
            f"<p>the last {len(runs)} succeeded ingest run(s), oldest first; shares of the rows read. A reason "
            "that jumps from one night to the next is a change in the source (docs/operations.md, "
            "events_quarantine)</p>\n" + "\n".join(table)
        )

    # -- explanations -------------------------------------------------------------------------
    def explanations_section(self, users: int = 3) -> str:
        """A few users' explanations from the newest night that has them (explain stage), without their keys:
        their scores, then each task's days with the weight (score with the day - score without it)."""
        from pyspark.sql import functions as F

        if not self.tables.exists("user_scores"):
            raise _not_yet("score", "no user_scores table")
        explained = self.tables.read("user_scores").where(F.size("explanations") > 0)
        newest = explained.agg(F.max("as_of_date")).first()
        if newest is None or newest[0] is None:
            raise _not_yet("explain", "no user_scores row has explanations (explain.users none, or no night yet)")
        rows = (
            explained.where(F.col("as_of_date") == F.lit(newest[0]))
            .orderBy(F.xxhash64("user_key"), "user_key")
            .select("purchase_propensity", "churn_risk", "explanations")
            .limit(users)
            .collect()
        )
        parts = [
            f"<p>{len(rows)} users scored on {_e(newest[0])}. A day's weight is the score with that day's events "
            "minus the score without them (the day left out of the text and the counts): positive, the day "
            "raised the score</p>"
        ]
        for i, row in enumerate(rows, 1):
            parts.append(
                f"<h3>user {i}: purchase propensity {_fmt(row['purchase_propensity'], 3)}, churn risk "
                f"{_fmt(row['churn_risk'], 3)}</h3>"
            )
            table = ["<table><tr><th>task</th><th>day</th><th>weight</th><th>what the user did that day</th></tr>"]
            for e in row["explanations"]:
                weight = f"{e['weight']:+.3f}" if e["weight"] is not None else "&ndash;"
                table.append(
                    f"<tr><td>{_e(e['task'])}</td><td>{_e(e['day'])}</td>"
                    f'<td class="n">{weight}</td><td>{_e(e["text"])}</td></tr>'
                )
            table.append("</table>")
            parts.append("\n".join(table))
        return "\n".join(parts)

    # -- the quality gate ---------------------------------------------------------------------
    def gate_section(self) -> str:
        """The newest gate run: its verdict and every check with its figure and limit (pipeline_runs)."""
        from pyspark.sql import functions as F

        if not self.tables.exists("pipeline_runs"):
            raise _not_yet("nightly", "no pipeline_runs table")
        row = (
            self.tables.read("pipeline_runs")
            .where(F.col("stage") == "gate")
            .orderBy(F.desc("started_at"))
            .select("run_id", "as_of_date", "status", "started_at", "details")
            .first()
        )
        if row is None:
            raise _not_yet("nightly", "no gate run in pipeline_runs (gate.enabled false, or no night yet)")
        try:
            details = json.loads(row["details"] or "{}")
        except ValueError:
            details = {}
        checks = details.get("checks") or []
        if details.get("forced") and details.get("failed_checks"):
            verdict = "failed, published with --force"
        elif row["status"] == "succeeded":
            verdict = "passed: the night was published"
        else:
            verdict = 'refused: nothing was published (docs/operations.md, "The quality gate")'
        table = ["<table><tr><th>check</th><th>result</th><th>figure</th><th>limit</th><th>what was measured</th></tr>"]
        for c in checks:
            mark = ' class="bad"' if c.get("status") == "fail" else ""
            table.append(
                f"<tr{mark}><td>{_e(c.get('name'))}</td><td>{_e(c.get('status'))}</td>"
                f'<td class="n">{_fmt(c.get("value"), 3)}</td><td class="n">{_fmt(c.get("limit"), 3)}</td>'
                f"<td>{_e(c.get('detail'))}</td></tr>"
            )
        table.append("</table>")
        notes = "".join(f"<p>{_e(n)}</p>\n" for n in details.get("notes") or [])
        return (
            f"<p>night of {_e(row['as_of_date'])} (run {_e(row['run_id'])}): <b>{_e(verdict)}</b>"
            + (f"; failed: {_e(', '.join(details['failed_checks']))}" if details.get("failed_checks") else "")
            + "</p>\n"
            + notes
            + "\n".join(table)
        )

    # -- runs ---------------------------------------------------------------------------------
    def runs_section(self) -> str:
        from pyspark.sql import functions as F

        if not self.tables.exists("pipeline_runs"):
            raise _not_yet("nightly", "no pipeline_runs table")
        runs = self.tables.read("pipeline_runs")
        latest = F.max_by(
            F.struct("run_id", "as_of_date", "status", "started_at", "finished_at", "rows_in", "rows_out", "details"),
            "started_at",
        )
        rows = (
            runs.groupBy("stage")
            .agg(latest.alias("r"))
            .select("stage", "r.*")
            .withColumn("seconds", F.col("finished_at").cast("double") - F.col("started_at").cast("double"))
            .withColumn("started", F.date_format("started_at", "yyyy-MM-dd HH:mm:ss"))
            .collect()
        )
        if not rows:
            raise _not_yet("nightly", "pipeline_runs is empty")
        order = self.stage_order
        rows.sort(key=lambda r: (order.index(r["stage"]) if r["stage"] in order else len(order), r["stage"]))
        self.dates.extend(r["as_of_date"] for r in rows if r["as_of_date"] is not None)
        zone = self.spark.conf.get("spark.sql.session.timeZone", "UTC")
        table = [
            "<table><tr><th>stage</th><th>status</th><th>as of</th>"
            f"<th>started ({_e(zone)})</th>"
            "<th>duration</th><th>rows in</th><th>rows out</th><th>rows in / s</th><th>note</th></tr>"
        ]
        for r in rows:
            seconds = r["seconds"]
            rate = r["rows_in"] / seconds if r["rows_in"] is not None and seconds else None
            table.append(
                f"<tr><td>{_e(r['stage'])}</td><td>{_e(r['status'])}</td><td>{_e(r['as_of_date'] or '')}</td>"
                f"<td>{_e(r['started'] or '')}</td>"
                f'<td class="n">{_duration(seconds)}</td><td class="n">{_fmt(r["rows_in"])}</td>'
                f'<td class="n">{_fmt(r["rows_out"])}</td><td class="n">{_fmt(rate, 1)}</td>'
                f"<td>{_e(_run_error(r['details']))}</td></tr>"
            )
        table.append("</table>")
        durations = [(r["stage"], r["seconds"]) for r in rows if r["seconds"] is not None]
        return "\n".join(table) + ("\n" + _duration_chart(durations) if durations else "")


# --------------------------------------------------------------------------- tables and text


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not np.isfinite(value):
            return _e(value)
        return f"{value:,.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return _e(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "&ndash;"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _run_error(details: str | None) -> str:
    if not details:
        return ""
    try:
        parsed = json.loads(details)
    except ValueError:
        return ""
    return str(parsed.get("error", "")) if isinstance(parsed, dict) else ""


def _group_table(rows: list[dict[str, Any]]) -> str:
    """One row per group: users, then per task AUC ± SE and ECE (binary) or accuracy, then recall@k."""
    if not rows:
        return "<p>no group large enough to show</p>"
    found = [key for key, value in rows[0].items() if isinstance(value, dict) and key != "recommend"]
    tasks = sorted(found, key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t))  # metrics.json sorts keys
    recall = next((k for r in rows for k in r.get("recommend", {}) if k.startswith("recall@")), None)
    head = ["group", "users"]
    for task in tasks:
        head += [f"{task} accuracy"] if "ece" not in rows[0][task] else [f"{task} AUC", f"{task} ECE"]
    if recall:
        head.append(f"recommend {recall}")
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [f"<td>{_e(row['group'])}</td>", f'<td class="n">{row["users"]:,}</td>']
        for task in tasks:
            figures = row.get(task, {})
            if "ece" not in rows[0][task]:
                cells.append(f'<td class="n">{_fmt(figures.get("accuracy"), 3)}</td>')
                continue
            auc = (
                f"{_fmt(figures['auc'], 3)} &plusmn; {_fmt(figures['auc_se'], 3)}"
                if "auc" in figures
                else "one class only"
            )
            cells += [f'<td class="n">{auc}</td>', f'<td class="n">{_fmt(figures.get("ece"), 3)}</td>']
        if recall:
            cells.append(f'<td class="n">{_fmt(row.get("recommend", {}).get(recall), 3)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _splits_table(splits: dict[str, Any]) -> str:
    if not splits:
        return ""
    order = [s for s in ("train", "valid", "test") if s in splits] + sorted(
        s for s in splits if s not in ("train", "valid", "test")
    )
    columns: list[str] = ["users"]
    for split in order:
        for key in splits[split] if isinstance(splits[split], dict) else {"users": splits[split]}:
            if key not in columns:
                columns.append(key)
    head = "".join(f"<th>{_split_column(c)}</th>" for c in columns)
    body = []
    for split in order:
        values = splits[split] if isinstance(splits[split], dict) else {"users": splits[split]}
        body.append(
            f"<tr><td>{_e(split)}</td>"
            + "".join(f'<td class="n">{_fmt(values.get(c))}</td>' for c in columns)
            + "</tr>"
        )
    return f"<table><tr><th>split</th>{head}</tr>{''.join(body)}</table>"


def _split_column(key: str) -> str:
    if key == "users":
        return "users"
    if key in BINARY_TASKS:
        return f"{_e(key)} = 1"
    return f"with {_e(key)}" if key in TASK_ORDER else _e(key)


def _metrics_table(model: dict[str, Any], baseline: dict[str, Any]) -> str:
    # metrics.json is written with sorted keys: show the known tasks in pipeline order first
    found = list(model) + [t for t in baseline if t not in model]
    tasks = [t for t in TASK_ORDER if t in found] + [t for t in found if t not in TASK_ORDER]
    if not tasks:
        return '<p class="na">metrics.json has no test metrics</p>'
    rows = ["<table><tr><th>task</th><th>metric</th><th>model</th><th>baseline</th></tr>"]
    for task in tasks:
        mine, theirs = (entry if isinstance(entry := m.get(task), dict) else {} for m in (model, baseline))
        known = BINARY_METRICS if "auc" in mine or "auc" in theirs else MULTICLASS_METRICS
        metrics = [(k, label) for k, label in known if k in mine or k in theirs]
        for key, label in metrics:
            note = " (lower is better)" if key in LOWER_IS_BETTER else ""
            rows.append(
                f'<tr><td>{_e(task)}</td><td>{label}{note}</td><td class="n">{_fmt(mine.get(key))}</td>'
                f'<td class="n">{_fmt(theirs.get(key))}</td></tr>'
            )
        n = mine.get("n", theirs.get("n"))
        if n is not None:
            rows.append(
                f'<tr><td>{_e(task)}</td><td>test users</td><td class="n">{_fmt(mine.get("n"))}</td>'
                f'<td class="n">{_fmt(theirs.get("n"))}</td></tr>'
            )
    rows.append("</table>")
    return "\n".join(rows)


# --------------------------------------------------------------------------- numbers


def _load_npz(uri: str) -> dict[str, np.ndarray]:
    from userlens.models.storage import exists, read_bytes

    if not exists(uri):
        raise FileNotFoundError(uri)
    with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct score threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    order = np.argsort(-p, kind="stable")
    p_sorted = p[order]
    cut = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p_sorted) - 1]
    true_pos = np.cumsum(y[order])[cut]
    false_pos = (cut + 1) - true_pos
    return np.r_[0.0, false_pos / false_pos[-1]], np.r_[0.0, true_pos / true_pos[-1]]


def _pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows projected on the first two principal components, and their shares of the variance."""
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    components = np.zeros((2, x.shape[1]))
    components[: min(2, len(vt))] = vt[:2]
    variance = singular**2
    share = variance / variance.sum() if variance.sum() > 0 else np.zeros_like(variance)
    return centred @ components.T, np.r_[share, 0.0, 0.0][:2]


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float, columns: int = 1) -> tuple["Figure", Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _png(fig: "Figure", alt: str) -> str:
    buffer = io.BytesIO()
    # no "Software" text chunk: it carries matplotlib's URL
    fig.savefig(buffer, format="png", dpi=80, metadata={"Software": None})
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{encoded}">'


def _plain(text: str) -> str:
    return text.replace("$", r"\$")  # keeps matplotlib from reading data as mathtext


def _thin(x: np.ndarray, y: np.ndarray, most: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= most:
        return x, y
    keep = np.unique(np.r_[np.linspace(0, len(x) - 1, most).astype(int), len(x) - 1])
    return x[keep], y[keep]


def same_predictions(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> bool:
    """Whether the model's and the baseline's test predictions are the same (a head that fell back to the
    baseline's regression): their curves would lie exactly on top of each other."""
    if set(series) != {"model", "baseline"}:
        return False
    (y1, p1), (y2, p2) = series["model"], series["baseline"]
    return y1.shape == y2.shape and bool(np.array_equal(y1, y2)) and bool(np.allclose(p1, p2, atol=1e-6))


def wilson_interval(positives: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval (95% by default) of a binomial proportion, per bin: (low, high)."""
    n = np.asarray(n, dtype=float)
    share = np.asarray(positives, dtype=float) / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def gains_by_decile(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Users ranked by score, best first, in ten equal groups: (cumulative share of all positives captured
    up to each decile, lift of each decile = its positive rate / the overall rate)."""
    order = np.argsort(-p, kind="stable")
    groups = np.array_split(y[order].astype(float), 10)
    positives = np.array([g.sum() for g in groups])
    sizes = np.array([len(g) for g in groups], dtype=float)
    rate = y.mean() if len(y) else 0.0
    gains = np.cumsum(positives) / max(positives.sum(), 1.0)
    lift = np.divide(positives / np.maximum(sizes, 1.0), rate) if rate > 0 else np.zeros(10)
    return gains, lift


def _roc_and_calibration(task: str, series: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[str, list[str]]:
    from userlens.models import metrics as M

    fig, (roc, calibration, gains) = _figure(13.5, 3.6, 3)
    problems: list[str] = []
    drawn = 0
    same = same_predictions(series)
    for name, (y, p) in series.items():
        try:
            auc = M.roc_auc(y, p)
            mean_p, observed, count = M.calibration_curve(y, p, bins=10)
            ece = M.expected_calibration_error(y, p, bins=10)
        except M.MetricInputError as exc:
            problems.append(f"{task} {name}: {first_line(exc)}")
            continue
        # identical curves: the baseline dashed and wider under the model, so both stay visible
        style = {"linestyle": "--", "linewidth": 3, "alpha": 0.6} if same and name == "baseline" else {}
        fpr, tpr = _thin(*roc_points(y, p))
        roc.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})", **style)
        low, high = wilson_interval(np.round(observed * count), count)
        calibration.errorbar(
            mean_p,
            observed,
            yerr=[np.clip(observed - low, 0, None), np.clip(high - observed, 0, None)],  # rounding: never < 0
            marker="o",
            capsize=2,
            label=f"{name} (ECE {ece:.3f})",
            **style,
        )
        if name == "model" or (name == "baseline" and "model" not in series):
            for x, o, n in zip(mean_p, observed, count):
                calibration.annotate(f"{int(n)}", (x, o), textcoords="offset points", xytext=(4, -10), fontsize=6)
        cumulative, lift = gains_by_decile(y, p)
        deciles = np.arange(1, 11) / 10
        gains.plot(np.r_[0, deciles], np.r_[0, cumulative], marker="o", label=f"{name}", **style)
        if name == "model" or (name == "baseline" and "model" not in series):
            gains.bar(
                deciles - 0.05, lift / max(lift.max(), 1.0), width=0.08, alpha=0.25, label=f"{name} lift (scaled)"
            )
            gains.annotate(f"top-decile lift {lift[0]:.1f}x", (0.1, 0.05), fontsize=7)
        drawn += 1
    if not drawn:
        return "", problems
    for ax in (roc, calibration, gains):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.legend(loc="lower right", fontsize=7)
    if same:
        roc.text(0.5, 0.15, "model = baseline: the same predictions", ha="center", fontsize=8, color="dimgrey")
    roc.set(title=f"{task}: ROC (test split)", xlabel="false positive rate", ylabel="true positive rate")
    calibration.set(
        title=f"{task}: reliability (10 bins; users per bin, 95% intervals)",
        xlabel="mean predicted probability",
        ylabel="observed fraction positive",
    )
    gains.set(title=f"{task}: gains by decile", xlabel="share of users, best scores first", ylabel="share of positives")
    alt = f"{task} ROC, reliability and gains curves, model and baseline" + (" (the same predictions)" if same else "")
    return _png(fig, alt), problems


def _histograms(counts: dict[str, np.ndarray]) -> str:
    fig, axes = _figure(9, 3, len(counts))
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    for ax, (name, values) in zip(axes, counts.items()):
        ax.bar(edges[:-1], values, width=np.diff(edges), align="edge", edgecolor="white")
        ax.set(title=name, xlabel="score", ylabel="users", xlim=(0, 1))
    return _png(fig, "histograms of " + " and ".join(counts))


def _embedding_map(points: np.ndarray, segment: np.ndarray) -> str:
    from matplotlib import colormaps

    fig, (ax,) = _figure(6.5, 5)
    none = segment < 0
    ax.scatter(points[none, 0], points[none, 1], s=6, color="#c8c8c8", label="no segment")
    ids = np.unique(segment[~none])
    palette = colormaps["tab10" if len(ids) <= 10 else "tab20"]
    for i, seg in enumerate(ids):
        mask = segment == seg
        ax.scatter(points[mask, 0], points[mask, 1], s=6, color=palette(i % palette.N), label=f"segment {seg}")
    if len(ids) <= 12:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set(xlabel="PC 1", ylabel="PC 2", title="user embeddings (PCA)")
    return _png(fig, "2-D PCA of sampled user embeddings, coloured by segment")


def _duration_chart(durations: list[tuple[str, float]]) -> str:
    fig, (ax,) = _figure(7, 0.45 * len(durations) + 1.2)
    positions = np.arange(len(durations))
    ax.barh(positions, [max(s, 0.0) for _, s in durations])
    ax.set_yticks(positions, [_plain(stage) for stage, _ in durations])
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title="latest run per stage")
    return _png(fig, "duration of each stage's latest run")
