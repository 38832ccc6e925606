"""A model's quality by group (userlens.models.quality): activity deciles, nearest published segment, the
figures per group against a direct computation, and the groups too small to show."""

from __future__ import annotations

import numpy as np
import pytest

from userlens.models import metrics as M
from userlens.models.quality import (
    Holdout,
    Segments,
    activity_groups,
    group_rows,
    nearest_segment,
    quality_by_group,
    quality_line,
)

TASKS = ["purchase", "next_category"]


def test_activity_deciles_keep_equal_counts_together_and_name_their_range():
    activity = np.array([1] * 30 + [2] * 30 + list(range(3, 43)), dtype=float)
    group, names = activity_groups(activity)
    # every user with 1 event is in one group, every user with 2 in the next: ties never straddle a group
    assert len(set(group[:30])) == 1 and len(set(group[30:60])) == 1 and group[0] < group[30]
    assert names[group[0]] == "1 events" and names[group[30]] == "2 events"
    assert (np.diff(group[np.argsort(activity, kind="stable")]) >= 0).all()  # more events, same or later group
    assert len(names) == len(set(group)) < 10  # ties merge deciles
    for g, name in enumerate(names):
        lo, hi = activity[group == g].min(), activity[group == g].max()
        assert name == (f"{lo:.0f} events" if lo == hi else f"{lo:.0f}-{hi:.0f} events")
    even, names = activity_groups(np.arange(100.0))
    assert len(names) == 10 and np.bincount(even).tolist() == [10] * 10


def test_nearest_segment_is_the_closest_centroid():
    rng = np.random.default_rng(3)
    centroids = rng.normal(size=(4, 8))
    x = centroids[[2, 0, 3, 1, 2]] + rng.normal(scale=0.01, size=(5, 8))
    assert nearest_segment(x, centroids).tolist() == [2, 0, 3, 1, 2]


def _test_set(rng: np.random.Generator, n: int) -> Holdout:
    activity = rng.integers(0, 60, n).astype(float)
    # the model separates heavy users well and light users hardly at all
    y = rng.integers(0, 2, n)
    signal = np.where(activity > 30, 2.0, 0.1)
    p = 1 / (1 + np.exp(-(signal * (y - 0.5) + rng.normal(size=n))))
    classes = rng.integers(-1, 3, n)
    proba = rng.dirichlet(np.ones(3), n)
    ranked = [[int(i) for i in rng.choice(50, 10, replace=False)] for _ in range(n // 2)]
    relevant = [{int(rng.integers(0, 50))} for _ in range(n // 2)]
    return Holdout(
        labels={"purchase": y, "next_category": classes},
        probs={"purchase": p, "next_category": proba},
        activity=activity,
        segment=rng.integers(0, 4, n),
        ranked=ranked,
        relevant=relevant,
        rec_rows=np.arange(0, n, 2),
    )


def test_each_groups_figures_equal_the_metrics_over_its_users():
    rng = np.random.default_rng(0)
    test = _test_set(rng, 600)
    group = (test.activity > 30).astype(int)
    out = group_rows(group, ["light", "heavy"], test, TASKS, 10, min_users=20)
    assert [r["group"] for r in out["groups"]] == ["light", "heavy"] and out["suppressed"] == 0
    for g, row in enumerate(out["groups"]):
        mask = group == g
        y, p = test.labels["purchase"][mask], test.probs["purchase"][mask]
        assert row["users"] == mask.sum()
        assert row["purchase"]["auc"] == pytest.approx(M.roc_auc(y, p))
        assert row["purchase"]["auc_se"] == pytest.approx(M.roc_auc_se(M.roc_auc(y, p), y.sum(), len(y) - y.sum()))
        assert row["purchase"]["ece"] == pytest.approx(M.expected_calibration_error(y, p))
        labelled = test.labels["next_category"][mask] >= 0
        assert row["next_category"]["accuracy"] == pytest.approx(
            M.accuracy(test.labels["next_category"][mask][labelled], test.probs["next_category"][mask][labelled])
        )
        judged = [i for i, r in enumerate(test.rec_rows) if group[r] == g]
        assert row["recommend"]["users"] == len(judged)
        assert row["recommend"]["recall@10"] == pytest.approx(
            M.recall_at_k([test.ranked[i] for i in judged], [test.relevant[i] for i in judged], 10)
        )
    light, heavy = out["groups"]
    assert heavy["purchase"]["auc"] > light["purchase"]["auc"] + 2 * heavy["purchase"]["auc_se"]  # visible


def test_small_groups_and_unpublished_segments_are_left_out_and_counted():
    rng = np.random.default_rng(1)
    test = _test_set(rng, 300)
    centroids = np.eye(4) * 5
    test.segment = np.r_[np.zeros(150, int), np.ones(140, int), np.full(8, 2), np.full(2, 3)]
    # segment 3 is not published; segment 2 is, but has 8 test users, fewer than min_users
    segments = Segments("seg-1", centroids, frozenset({0, 1, 2}))
    by_group = quality_by_group(test, TASKS, 10, 10, segments)
    seg = by_group["segment"]
    assert [r["group"] for r in seg["groups"]] == ["segment 0", "segment 1"]
    assert [r["users"] for r in seg["groups"]] == [150, 140]
    assert seg["suppressed"] == 1 and seg["unpublished_users"] == 2 and seg["segment_model_version"] == "seg-1"
    assert by_group["activity"]["quantiles"] == 10
    assert sum(r["users"] for r in by_group["activity"]["groups"]) == 300  # every decile has >= 10 users
    # a test split of fewer than ten times min_users users: fewer, larger groups (here 300 // 60 = 5)
    fifths = quality_by_group(test, TASKS, 10, 60, segments)["activity"]
    assert fifths["quantiles"] == 5 and 0 < len(fifths["groups"]) <= len(fifths["groups"]) + fifths["suppressed"] <= 5
    assert all(r["users"] >= 60 for r in fifths["groups"])
    assert "segment: 2 groups, purchase AUC" in quality_line(by_group)
    none_yet = quality_by_group(test, TASKS, 10, 10, None)
    assert "note" in none_yet["segment"] and "groups" in none_yet["activity"]
    test.segment = None  # read without centroids
    assert "note" in quality_by_group(test, TASKS, 10, 10, segments)["segment"]


def test_a_group_with_one_class_has_no_auc_but_its_calibration():
    rng = np.random.default_rng(2)
    test = _test_set(rng, 100)
    test.labels["purchase"] = np.zeros(100, int)
    out = group_rows(np.zeros(100, int), ["all"], test, TASKS, 10, 10)
    row = out["groups"][0]["purchase"]
    assert "auc" not in row and row["positives"] == 0
    assert row["ece"] == pytest.approx(M.expected_calibration_error(test.labels["purchase"], test.probs["purchase"]))
