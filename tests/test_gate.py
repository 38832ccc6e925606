"""The quality gate's checks on their own: the statistics without Spark, the table checks on small Delta
tables of the test's own rows, the model pointers, the restore of user_scores. The whole gate in a
nightly (a corrupted night refused, then published with --force) is in tests/test_nightly.py."""

from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F

from conftest import make_settings
from userlens.artifacts import ModelStore
from userlens.config import GateSettings
from userlens.models.contracts import ModelMetrics, TrainingData, TrainingInfo
from userlens.stages import BY_NAME, nightly_stages
from userlens.stages.gate import (
    Check,
    GateFailed,
    GateResult,
    model_checks,
    prices_check,
    psi_checks,
    recommendation_check,
    restore_scores,
    rows_check,
)
from userlens.tables import Tables

GATE = GateSettings()
DAY = dt.date(2026, 10, 15)


def metrics(purchase_auc: float, n: int, positives: int, recall: float | None = None, users: int = 0) -> ModelMetrics:
    model = {
        "purchase": {"auc": purchase_auc, "n": n, "positives": positives},
        "churn": {"auc": 0.7, "n": n, "positives": positives},
    }
    if recall is not None:
        model["recommend"] = {"recall@10": recall, "users": users}
    info = TrainingInfo(0, 0.0, 1, n, 0.0, 0.0, 1, "cpu")
    return ModelMetrics("v", "s", model, {}, TrainingData("2026-10-14", "2026-10-07", 7, {}, "m"), info)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_model_much_worse_on_a_large_test_split_fails_and_the_same_drop_on_a_small_one_does_not():
    big = by_name(model_checks(metrics(0.80, 4000, 800), metrics(0.70, 4000, 800), GATE, 10))
    assert big["model.purchase_auc"].status == "fail"
    assert big["model.purchase_auc"].value == pytest.approx(0.10)
    assert big["model.churn_auc"].status == "pass"  # the same AUC
    # 0.10 lower on 30 users (6 positives): about 1 SE, so chance can explain it
    small = by_name(model_checks(metrics(0.80, 30, 6), metrics(0.70, 30, 6), GATE, 10))
    assert small["model.purchase_auc"].status == "pass"
    # a drop within the margin passes however many users there are
    close = by_name(model_checks(metrics(0.80, 100_000, 20_000), metrics(0.77, 100_000, 20_000), GATE, 10))
    assert close["model.purchase_auc"].status == "pass"


def test_recall_drops_are_judged_as_a_share_of_the_published_recall():
    worse = by_name(model_checks(metrics(0.8, 100, 20, 0.30, 5000), metrics(0.8, 100, 20, 0.20, 5000), GATE, 10))
    assert worse["model.recall"].status == "fail" and worse["model.recall"].value == pytest.approx(1 / 3)
    fine = by_name(model_checks(metrics(0.8, 100, 20, 0.30, 5000), metrics(0.8, 100, 20, 0.27, 5000), GATE, 10))
    assert fine["model.recall"].status == "pass"  # 10 % lower: within max_recall_drop


def test_without_two_models_the_model_check_is_skipped():
    assert [c.status for c in model_checks(None, None, GATE, 10)] == ["skip"]
    assert [c.status for c in model_checks(None, metrics(0.8, 100, 20), GATE, 10)] == ["skip"]


def test_rows_are_held_against_the_median_of_earlier_ingests_per_raw_date():
    # newest first: (events, raw dates); a 14-day backfill counts per date
    assert rows_check([(600, 1), (650 * 14, 14)], GATE).status == "pass"
    low = rows_check([(50, 1), (600, 1), (640, 1), (9_000, 14)], GATE)
    assert low.status == "fail" and low.value == pytest.approx(50 / 640)
    assert rows_check([(6_000, 1), (600, 1)], GATE).status == "fail"  # a replayed feed: 10x
    assert rows_check([(600, 1)], GATE).status == "skip"  # nothing before it
    assert rows_check([(0, 0), (600, 1)], GATE).status == "skip"  # the newest ingest read no new date


def test_a_refused_night_is_one_line_naming_the_first_failed_check_with_every_check_in_details():
    checks = (
        Check("psi.churn_risk", "pass", "fine", 0.01, 0.25),
        Check("prices", "fail", "100.0% of the night's 40 purchases have no positive price", 1.0, 0.2),
        Check("rows", "fail", "too few", 0.01, 0.2),
    )
    err = GateFailed(GateResult(DAY, checks, candidate="m2", model_version="m1"))
    assert "\n" not in str(err)
    assert str(err).startswith("gate refused the night of 2026-10-15: prices: 100.0% of the night's 40 purchases")
    assert "(and 1 more check(s))" in str(err) and "userlens publish --force" in str(err)
    assert err.details["failed_checks"] == ["prices", "rows"] and err.details["passed"] is False
    assert err.details["checks"][1] == {
        "name": "prices",
        "status": "fail",
        "detail": "100.0% of the night's 40 purchases have no positive price",
        "value": 1.0,
        "limit": 0.2,
    }
    summary = BY_NAME["gate"].summary(err.result)
    assert summary.splitlines()[0].startswith("gate: failed: nothing published (1 checks passed, 2 failed")
    assert "model m2 refused" in summary.splitlines()[0]


def test_the_gate_runs_between_score_and_profile_and_can_be_switched_off(tmp_path):
    names = [s.name for s in nightly_stages()]
    assert names.index("score") + 1 == names.index("gate") == names.index("profile") - 1
    from userlens.stages import StageCall

    off = make_settings(tmp_path, "gate.enabled=false")
    assert BY_NAME["gate"].nightly_skip(StageCall(None, off)) == "gate.enabled is false"  # type: ignore[arg-type]
    assert BY_NAME["gate"].nightly_skip(StageCall(None, make_settings(tmp_path))) is None  # type: ignore[arg-type]


def test_the_model_pointers_candidate_refused_and_published(tmp_path):
    store = ModelStore(str(tmp_path))
    assert store.serving() is None and store.promote() is None and store.refuse() is None
    store.publish("m1")
    store.propose("m2")
    assert (store.latest(), store.candidate(), store.serving()) == ("m1", "m2", "m2")
    assert store.refuse() == "m2"
    assert (store.latest(), store.candidate(), store.refused(), store.serving()) == ("m1", None, "m2", "m1")
    assert store.reconsider() == "m2" and store.refused() is None and store.serving() == "m2"
    assert store.promote() == "m2"
    assert (store.latest(), store.candidate(), store.serving()) == ("m2", None, "m2")


# -------------------------------------------------------------------------- on Spark
def scores(spark, rows):
    return spark.createDataFrame(
        rows, "user_key string, purchase_propensity double, churn_risk double, recommended_items array<string>"
    )


def test_psi_is_small_for_the_same_distribution_large_for_a_shifted_one_and_a_note_with_a_new_model(spark):
    before = scores(spark, [(f"u{i}", i / 200, (i % 50) / 50, None) for i in range(200)])
    same = scores(spark, [(f"u{i}", (i + 1) / 200, (i % 50) / 50, None) for i in range(200)])
    shifted = scores(spark, [(f"u{i}", 0.9 + i / 2000, (i % 50) / 50, None) for i in range(200)])
    assert {c.status for c in psi_checks(before, same, GATE)} == {"pass"}
    moved = by_name(psi_checks(before, shifted, GATE))
    assert moved["psi.purchase_propensity"].status == "fail" and moved["psi.purchase_propensity"].value > 1
    assert moved["psi.churn_risk"].status == "pass"
    noted = by_name(psi_checks(before, shifted, GATE, new_model=True))
    assert noted["psi.purchase_propensity"].status == "note" and "not gated" in noted["psi.purchase_propensity"].detail


def test_recommendation_churn_counts_users_whose_first_three_items_changed(spark):
    before = scores(spark, [(f"u{i}", 0.5, 0.5, ["a", "b", "c", "d"]) for i in range(10)])
    # 4 of 10 users get another top 3; a change below the third item is no change
    after = scores(
        spark,
        [(f"u{i}", 0.5, 0.5, ["x", "b", "c"] if i < 4 else ["a", "b", "c", "z"]) for i in range(10)],
    )
    check = recommendation_check(before, after, GATE)
    assert check.status == "pass" and check.value == pytest.approx(0.4)
    assert recommendation_check(before, after, GateSettings(max_recommendations_changed=0.3)).status == "fail"


def test_prices_check_compares_the_nights_unpriced_purchases_with_the_days_before(spark, tmp_path):
    settings = make_settings(tmp_path)
    tables = Tables(spark, settings.storage)
    rows = []
    for d in range(8):
        day = DAY - dt.timedelta(days=7 - d)
        for i in range(30):
            price = 0.0 if (day == DAY or i == 0) else 10.0  # one unpriced purchase a day; the night none priced
            rows.append((f"e{d}-{i}", day, "purchase", price))
    given = spark.createDataFrame(rows, "event_id string, event_date date, event_type string, price double")
    schema = tables.read("events").schema
    filled = {"user_key": F.lit("k"), "event_time": F.col("event_date").cast("timestamp")}
    tables.append(
        "events",
        given.select(
            *[
                F.col(f.name)
                if f.name in given.columns
                else filled.get(f.name, F.lit(None)).cast(f.dataType).alias(f.name)
                for f in schema.fields
            ]
        ),
    )
    check = prices_check(tables, [DAY], GATE)
    assert check.status == "fail" and check.value == pytest.approx(1.0 - 1 / 30)
    assert prices_check(tables, [DAY - dt.timedelta(days=1)], GATE).status == "pass"
    assert prices_check(tables, [], GATE).status == "skip"


def test_restore_brings_back_the_published_scores_unless_something_else_wrote_since(spark, tmp_path):
    settings = make_settings(tmp_path)
    tables = Tables(spark, settings.storage)
    row = ("u1", DAY, "m1", "h", 0.5, 0.5, None, None, dt.datetime(2026, 10, 15), None, None)
    tables.merge("user_scores", spark.createDataFrame([row], tables.read("user_scores").schema))
    published = tables.version("user_scores")
    night = ("u1", DAY + dt.timedelta(days=1), "m2", "h2", 0.9, 0.1, None, None, dt.datetime(2026, 10, 16), None, None)
    tables.merge("user_scores", spark.createDataFrame([night], tables.read("user_scores").schema))
    assert tables.read("user_scores").count() == 2
    restored, why = restore_scores(tables, published)
    assert (restored, why) == (published, None)
    assert [r["model_version"] for r in tables.read("user_scores").collect()] == ["m1"]
    # a delete (forget) after the published version: restoring would bring the deleted row back
    tables.merge("user_scores", spark.createDataFrame([night], tables.read("user_scores").schema))
    tables.delta("user_scores").delete(F.col("as_of_date") == F.lit(DAY))
    restored, why = restore_scores(tables, published)
    assert restored is None and "DELETE" in why
    assert [r["model_version"] for r in tables.read("user_scores").collect()] == ["m2"]  # left as it was
