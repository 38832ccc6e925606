"""`userlens evaluate`: the splits, the ranking engine, item-kNN and MRR by hand, and each protocol end to end
on fixture files (popularity's numbers worked out by hand, or recomputed independently from the split)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

import dataset_files as D
from conftest import SPARK_OVERRIDES, STATE_ON, TEST_KEY, make_settings
from userlens.cli import main
from userlens.config import CONF_DIR, load_settings
from userlens.eval.baselines import ItemKNN, rank_batch
from userlens.eval.evaluate import (
    _Fitted,
    _fitted_row,
    interactions,
    leave_one_out,
    load_dataset,
    next_window_users,
    stratified_split,
)
from userlens.models import metrics as M
from userlens.privacy import load_key
from userlens.stages.forget import user_key_of
from userlens.tables import Tables

LOCAL = str(CONF_DIR / "local.yaml")


# --- metric and ranking engine by hand ------------------------------------------------------------


def test_mrr_from_ranks_by_hand_and_equal_to_mrr_over_full_rankings():
    # first relevant item at rank 1, 3, never, 2
    assert M.mrr_from_ranks([1, 3, math.inf, 2]) == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)
    rankings = [["a", "b", "c"], ["b", "c", "a"], ["a", "b", "c"], ["c", "a", "b"]]
    relevant = [{"a"}, {"a"}, {"x"}, {"a", "b"}]
    assert M.mrr_from_ranks([1, 3, math.inf, 2]) == pytest.approx(M.mrr(rankings, relevant))
    for bad in ([], [0, 1], [1.5], [[1]], [float("nan")]):
        with pytest.raises(M.MetricInputError, match="mrr_from_ranks"):
            M.mrr_from_ranks(bad)


def test_rank_batch_removes_seen_breaks_ties_by_index_and_ranks_unscored_last():
    scores = np.array([[0.5, 0.9, 0.5, -np.inf, 0.1], [1.0, 1.0, 1.0, 1.0, np.nan]])
    seen = [np.array([1]), np.array([0, 2])]
    targets = [np.array([3]), np.array([4, 3])]
    tops, ranks = rank_batch(scores, seen, targets, k=3)
    # user 0: item 1 is seen; 0 and 2 tie at 0.5 (lower index first), then 4; item 3 cannot be scored
    assert tops[0] == [0, 2, 4]
    assert ranks[0] == 4
    # user 1: 1 and 3 remain scored; the NaN item 4 comes last; the better target (3) is 2nd
    assert tops[1] == [1, 3, 4]
    assert ranks[1] == 2
    # a target the user has seen cannot be ranked
    assert rank_batch(scores[:1], seen[:1], [np.array([1])], 2)[1][0] == math.inf


def test_item_knn_jaccard_neighbours_and_time_decay_by_hand():
    # users: 0 -> {0, 1}, 1 -> {0, 1, 2}, 2 -> {1, 2}; co-occurrence 0-1: 2, 1-2: 2, 0-2: 1;
    # occurrences 2, 3, 2 -> Jaccard 0-1 = 2/3, 1-2 = 2/3, 0-2 = 1/3
    users, items = np.array([0, 0, 1, 1, 1, 2, 2]), np.array([0, 1, 0, 1, 2, 1, 2])
    ts = np.array([0, 86_400, 0, 0, 0, 0, 0])
    flat = ItemKNN(users, items, ts, 3, 3, half_life_days=None)
    np.testing.assert_allclose(flat.scores(np.array([0])), [[2 / 3, 2 / 3, 1 / 3 + 2 / 3]])
    # one neighbour per item: 0 -> 1, 1 -> 0 (a tie with 2, lower index), 2 -> 1; so nothing reaches item 2
    np.testing.assert_allclose(
        ItemKNN(users, items, ts, 3, 3, None, neighbors=1).scores(np.array([0])), [[2 / 3, 2 / 3, 0.0]]
    )
    # half-life one day: user 0's item 0 is a day older than its item 1, so it weighs 1/2
    decayed = ItemKNN(users, items, ts, 3, 3, half_life_days=1.0)
    np.testing.assert_allclose(decayed.scores(np.array([0])), [[2 / 3, 1 / 3, 0.5 / 3 + 2 / 3]])


# --- splits ----------------------------------------------------------------------------------------


def _interactions(spark, rows):
    return spark.createDataFrame(rows, "user string, item string, ts long, event_id string")


def test_interactions_carry_the_score_a_rating_text_starts_with(spark):
    events = spark.createDataFrame(
        [
            ("u1", "i1", "rate", 10, "e1", "4/5. Great fit"),
            ("u1", "i2", "rate", 11, "e2", "3.5/5"),
            ("u2", "i1", "rate", 12, "e3", "no score here: 4/5 later"),
            ("u2", "i3", "rate", 13, "e4", None),
            ("u3", "i1", "rate", 14, "e5", "45/50 is not a score"),
        ],
        "user_key string, item_id string, event_type string, t long, event_id string, text string",
    ).withColumn("event_time", F.col("t").cast("timestamp"))
    scores = {r["event_id"]: r["score"] for r in interactions(events, ["rate"]).collect()}
    assert scores == {"e1": 4.0, "e2": 3.5, "e3": None, "e4": None, "e5": None}


def test_leave_one_out_takes_the_last_two_and_keeps_short_users_in_train(spark):
    inter = _interactions(
        spark,
        [
            ("a", "i1", 1, "e1"),
            ("a", "i2", 2, "e2"),
            ("a", "i3", 3, "e3"),
            ("a", "i4", 3, "e4"),  # a tie in time: event_id decides
            ("b", "i1", 5, "e5"),
            ("b", "i2", 6, "e6"),
        ],
    )
    assertDataFrameEqual(
        leave_one_out(inter).select("user", "item", "split"),
        [
            Row(user="a", item="i1", split="train"),
            Row(user="a", item="i2", split="train"),
            Row(user="a", item="i3", split="valid"),
            Row(user="a", item="i4", split="test"),
            Row(user="b", item="i1", split="train"),
            Row(user="b", item="i2", split="train"),
        ],
    )


def test_stratified_split_is_per_user_seeded_and_independent_of_partitioning(spark):
    rows = [(f"u{u}", f"i{i}", i, f"e{u}-{i}") for u in range(6) for i in range(u + 1)]
    rows.append(("u5", "i0", 99, "again"))  # a repeated pair counts once
    inter = _interactions(spark, rows)
    split = stratified_split(inter, 0.75, 13)
    counts = split.groupBy("user").agg(
        F.sum((F.col("split") == "train").cast("int")).alias("train"), F.count(F.lit(1)).alias("n")
    )
    per_user = {r["user"]: (r["train"], r["n"]) for r in counts.collect()}
    # round(0.75 n), half up: 1 -> 1, 2 -> 2, 3 -> 2, 4 -> 3, 5 -> 4, 6 -> 5
    assert per_user == {"u0": (1, 1), "u1": (2, 2), "u2": (2, 3), "u3": (3, 4), "u4": (4, 5), "u5": (5, 6)}
    again = stratified_split(inter.repartition(5), 0.75, 13)
    assertDataFrameEqual(again.select("user", "item", "split"), split.select("user", "item", "split"))
    other_seed = stratified_split(inter, 0.75, 14).select("user", "item", "split")
    assert sorted(map(tuple, other_seed.collect())) != sorted(
        map(tuple, split.select("user", "item", "split").collect())
    )


# --- end to end ------------------------------------------------------------------------------------


def _evaluate(tmp_path: Path, capsys, *args: str) -> tuple[str, dict[str, list[str]]]:
    out = tmp_path / "table.md"
    code = main(
        [
            "evaluate",
            *args,
            "--out",
            str(out),
            *[x for o in SPARK_OVERRIDES for x in ("--set", o)],
            "--set",
            f"storage.warehouse={tmp_path / 'wh'}",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    # a benchmark leaves the warehouse alone unless asked to record its run
    assert (tmp_path / "wh").exists() == ("--record" in args)
    table = out.read_text()
    assert table in printed
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return table, rows


def _numbers(cells: list[str]) -> list[float]:
    """The metric cells' values (``value ± standard error``), without the setting and seconds cells."""
    values = [float(c.split(" ± ")[0]) for c in cells[:-2]]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(" ± " in c for c in cells[:-2]) and float(cells[-1]) >= 0  # every metric has its error
    return values


def test_loo_full_end_to_end_with_popularity_worked_by_hand(spark, tmp_path, capsys):
    root = D.write_ml100k(tmp_path / "ml-100k")
    # the userlens row runs in the stratified-75 test; fewer ALS sweeps keep this one quick
    table, rows = _evaluate(
        tmp_path,
        capsys,
        "--dataset",
        "movielens-100k",
        "--path",
        str(root),
        "--protocol",
        "loo-full",
        "--k",
        "1",
        "2",
        "3",
        "--set",
        "evaluate.userlens=false",
        "--set",
        "train.recommend.als.max_iter=5",
        "--set",
        "evaluate.als_reg_params=[0.01, 0.1, 1.0]",
        "--set",
        "evaluate.als_alphas=[1.0, 10.0]",
    )
    assert (
        "| method | HR@1 | HR@2 | HR@3 | NDCG@1 | NDCG@2 | NDCG@3 | MRR | valid NDCG@3 "
        "| chosen on validation | seconds |" in table
    )
    assert "19 rows read: 19 events, 0 quarantined, 0 duplicates; 5 users, 6 items, 19 interactions" in table
    # Test fit = all but each user's last rating. Counts: item 1: 5, 2: 4, 3: 2, 4: 2, 5: 1, 6: 0, so the
    # order is 1, 2, 3, 4 (tie: lower index), 5, 6. Without seen items the test item ranks:
    #   user 1 (seen 1 2 3): 4 5 [6] -> 3    user 2 (seen 1 2 4): [3] -> 1    user 3 (seen 1 2 3): 4 [5] -> 2
    #   user 4 (seen 1 2 4): 3 5 [6] -> 3    user 5 (seen 1 5):   2 3 [4] -> 3
    # Valid fit = all but the last two: counts 1: 5, 2: 3, 3: 1; valid ranks 1, 2, 1, 2, 4.
    ndcg = {1: 1.0, 2: 1 / math.log2(3), 3: 0.5}
    expected = [
        1 / 5,
        2 / 5,
        5 / 5,  # HR@1..3
        1 / 5,
        (1 + ndcg[2]) / 5,
        (1 + ndcg[2] + 3 * ndcg[3]) / 5,  # NDCG@1..3
        (1 / 3 + 1 + 1 / 2 + 1 / 3 + 1 / 3) / 5,  # MRR
        (2 + 2 * ndcg[2]) / 5,
    ]  # valid NDCG@3
    assert _numbers(rows["popularity"]) == pytest.approx([round(v, 4) for v in expected], abs=1e-4)
    for method in ("ALS (Spark MLlib, implicit)", "EASE", "item-kNN (SAR co-occurrence)"):
        _numbers(rows[method])
    # the chosen setting of each tuned baseline is printed (ALS: one of the regParam x alpha grid)
    assert rows["EASE"][-2].startswith("lam=") and "reg_param=" in rows["ALS (Spark MLlib, implicit)"][-2]
    assert not [name for name in rows if name.startswith("userlens")]


def test_stratified_75_end_to_end_matches_an_independent_popularity(spark, tmp_path, capsys):
    root = D.write_ml100k(tmp_path / "ml-100k")
    table, rows = _evaluate(
        tmp_path,
        capsys,
        "--dataset",
        "movielens-100k",
        "--path",
        str(root),
        "--protocol",
        "stratified-75",
        "--k",
        "2",
        "--set",
        "train.recommend.max_epochs=4",
        "--set",
        "train.recommend.dim=16",
        "--set",
        "evaluate.als_reg_params=[0.1]",
    )
    assert (
        "| method | MAP@2 | nDCG@2 | Precision@2 | Recall@2 | valid nDCG@2 | chosen on validation | seconds |" in table
    )
    # the same split, then popularity written out plainly
    settings = load_settings(
        [LOCAL, CONF_DIR / "datasets" / "movielens-100k.yaml"], [*SPARK_OVERRIDES, f"source.path={root}"]
    )
    data, classified = load_dataset(spark, settings, load_key(settings.privacy, {"USERLENS_HMAC_KEY": TEST_KEY}))
    split = stratified_split(interactions(data.events, ["rate"]), 0.75, settings.evaluate.seed).collect()
    classified.unpersist()
    train = [(r["user"], r["item"]) for r in split if r["split"] == "train"]
    test = [(r["user"], r["item"]) for r in split if r["split"] == "test"]
    counts = {i: sum(1 for _, j in train if j == i) for i in sorted({r["item"] for r in split})}
    precision, recall = [], []
    for user in sorted({u for u, _ in test}):
        seen = {i for u, i in train if u == user}
        top = sorted((i for i in counts if i not in seen), key=lambda i: (-counts[i], i))[:2]
        held = {i for u, i in test if u == user}
        precision.append(len(held & set(top)) / 2)
        recall.append(len(held & set(top)) / len(held))
    values = _numbers(rows["popularity"])
    assert values[2] == pytest.approx(np.mean(precision), abs=1e-4)
    assert values[3] == pytest.approx(np.mean(recall), abs=1e-4)
    _numbers(rows["ALS (Spark MLlib, implicit)"])
    _numbers(rows["item-kNN (SAR co-occurrence)"])
    # userlens: its components, and the fusion, whose validation score is at least its lead component's
    components = [
        "userlens: sequential (ids + item text)",
        "userlens: sequential (ids only)",
        "EASE",
        "ALS (Spark MLlib, implicit)",
    ]
    for name in ("userlens", "userlens without text", *components):
        _numbers(rows[name])
    assert _numbers(rows["userlens"])[4] >= max(_numbers(rows[n])[4] for n in components[:1] + components[2:]) - 1e-4


def test_next_window_rated_4_or_more_counts_the_window_only(spark, tmp_path):
    """A ratings dataset's next-window target: a rating of 4 or more in (cut, as-of], not before."""
    import datetime as dt

    root = D.write_ml100k(tmp_path / "ml-100k")
    settings = load_settings(
        [LOCAL, CONF_DIR / "datasets" / "movielens-100k.yaml"], [*SPARK_OVERRIDES, f"source.path={root}"]
    )
    key = load_key(settings.privacy, {"USERLENS_HMAC_KEY": TEST_KEY})
    data, classified = load_dataset(spark, settings, key)
    try:
        # the n-th rating of every user is on day n after T0's date: the window holds ratings 2 and 3
        day0 = dt.datetime.fromtimestamp(D.T0, dt.timezone.utc).date()
        cut, as_of = day0 + dt.timedelta(days=1), day0 + dt.timedelta(days=3)
        got = {
            r["user_key"]: (r["active"], r["purchase"], r["liked"])
            for r in next_window_users(data.events, cut, as_of, ["rate"], 13).collect()
        }
    finally:
        classified.unpersist()
    expected = {
        user_key_of(str(user), key): (1, 0, int(any((user + item) % 5 + 1 >= 4 for item in items[2:4])))
        for user, items in D.ML100K_HISTORIES.items()
    }
    assert got == expected
    # both values occur, and one user's only 4-star rating is before the cut: the label reads the window only
    assert {v[2] for v in got.values()} == {0, 1}
    assert any(
        not expected[user_key_of(str(u), key)][2] and any((u + i) % 5 + 1 >= 4 for i in items[:2])
        for u, items in D.ML100K_HISTORIES.items()
    )


def test_next_window_end_to_end_recency_separates_activity(spark, tmp_path, capsys):
    root = D.write_retailrocket(tmp_path / "retailrocket")
    # the state view on (off by default), one regParam for the bag of words (the grid's choice: test_train)
    table, rows = _evaluate(
        tmp_path,
        capsys,
        "--dataset",
        "retailrocket",
        "--path",
        str(root),
        "--protocol",
        "next-window",
        "--record",
        *[a for item in (*STATE_ON, "train.linear_reg_params=[0.1]") for a in ("--set", item)],
    )
    runs = Tables(spark, make_settings(tmp_path, f"storage.warehouse={tmp_path / 'wh'}").storage).read("pipeline_runs")
    recorded = runs.collect()
    assert [(r["stage"], r["status"]) for r in recorded] == [("evaluate", "succeeded")]  # --record: its one row
    assert recorded[0]["rows_in"] > 0
    assert "cutoff 2015-06-14, labels from the 7 days after it (to 2015-06-21); 60 users" in table
    # even visitors were seen on the two days before the cutoff and return; odd ones were last seen
    # a week or more earlier and do not: days since the last event ranks every returner first
    assert rows["recency (days since last event)"][0].startswith("1.0000 ± ")
    for method in (
        "frequency (events up to the cutoff)",
        "logistic regression (MLlib, RFM features)",
        "userlens (user-text embedding + RFM, MLlib LR)",
        "userlens: state (embeddings + RFM, MLlib LR)",
        "userlens: history + state (embeddings + RFM, MLlib LR)",
        "bag of words + RFM (MLlib LR, regParam chosen on valid)",
    ):
        _numbers(rows[method])
    # every regression's regParam is chosen on held-out train users; a userlens row not above the RFM
    # regression there says that it scores with it
    for method in ("userlens (user-text embedding + RFM, MLlib LR)", "userlens: state (embeddings + RFM, MLlib LR)"):
        assert re.fullmatch(r"active: (regParam=0\.1|RFM \(valid AUC \S+ <= \S+\)).*", rows[method][-2])
    assert rows["logistic regression (MLlib, RFM features)"][-2].startswith("active: regParam=0.1")


def test_a_next_window_row_not_above_rfm_on_validation_scores_with_rfm():
    """The fallback the train stage ships, in evaluate's next-window rows: per target."""
    y = {"active": np.array([0, 1, 0, 1, 1, 0]), "purchase": np.array([1, 0, 0, 1, 0, 0])}
    rfm = _Fitted(
        p={"active": np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3]), "purchase": np.array([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])},
        valid_auc={"active": 0.80, "purchase": 0.60},
        reg={"active": 0.1, "purchase": 0.1},
    )
    mine = _Fitted(
        p={"active": np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.7]), "purchase": np.array([0.9, 0.1, 0.1, 0.8, 0.2, 0.1])},
        valid_auc={"active": 0.80, "purchase": 0.70},  # a tie is not above: RFM ships
        reg={"active": 1.0, "purchase": 0.01},
    )
    row = _fitted_row(y, mine, 0.0, rfm)
    assert row["active"] == M.roc_auc(y["active"], rfm.p["active"]) == 1.0
    assert row["purchase"] == M.roc_auc(y["purchase"], mine.p["purchase"]) == 1.0
    assert row["setting"] == "active: RFM (valid AUC 0.800 <= 0.800); purchase: regParam=0.01"
    assert _fitted_row(y, mine, 0.0)["active"] == 0.0  # without the RFM row, the model's own scores
