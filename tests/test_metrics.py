"""Metrics equal scikit-learn's on random data (ties included) and hand-worked tiny cases; bad input is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import calibration as skcal
from sklearn import metrics as sk

from userlens.models import metrics as m


def _binary_case(seed: int, n: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    # tied: five distinct scores, so most rows share a score with many others
    p = rng.integers(0, 5, n) / 4 if tied else rng.random(n)
    return y, p


# --- binary ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,n,tied", [(0, 50, False), (1, 1000, False), (2, 40, True), (3, 2000, True)])
def test_binary_metrics_equal_sklearn(seed, n, tied):
    y, p = _binary_case(seed, n, tied)
    assert m.roc_auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    assert m.pr_auc(y, p) == pytest.approx(sk.average_precision_score(y, p), abs=1e-12)
    p_inside = 0.01 + 0.98 * p  # away from the clip so eps conventions cannot differ
    assert m.log_loss(y, p_inside) == pytest.approx(sk.log_loss(y, p_inside), abs=1e-12)


def test_auc_and_ap_by_hand_with_ties():
    y = [1, 0, 1, 0]
    p = [0.8, 0.8, 0.5, 0.1]
    # AUC: pairs (pos, neg): (0.8, 0.8) tie = 0.5, (0.8, 0.1) = 1, (0.5, 0.8) = 0, (0.5, 0.1) = 1 -> 2.5 / 4
    assert m.roc_auc(y, p) == pytest.approx(0.625)
    # AP: threshold 0.8 -> precision 1/2, recall 1/2; 0.5 -> precision 2/3, recall 1
    #     = 0.5 * 1/2 + 0.5 * 2/3 = 7/12 (the tie is one threshold, not ordered either way)
    assert m.pr_auc(y, p) == pytest.approx(7 / 12)


def test_log_loss_clips_certain_mistakes():
    # -(log(0.5) + log(eps)) / 2 with p=0 for a positive clipped to eps
    assert m.log_loss([1, 1], [0.5, 0.0], eps=1e-7) == pytest.approx(-(math.log(0.5) + math.log(1e-7)) / 2)
    assert m.log_loss([0, 1], [0.0, 1.0]) == pytest.approx(-math.log(1 - 1e-7))


def test_ece_near_zero_when_calibrated():
    rng = np.random.default_rng(7)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(int)
    assert m.expected_calibration_error(y, p) < 0.01
    # exactly calibrated: every bin's mean p equals its positive rate
    assert m.expected_calibration_error([1, 0, 0, 0, 1, 1, 1, 0], [0.25] * 4 + [0.75] * 4) == pytest.approx(0.0)


def test_ece_and_curve_by_hand_when_miscalibrated():
    p = [0.2, 0.2, 0.2, 0.2, 0.9, 1.0]
    y = [1, 1, 1, 1, 0, 1]
    # bin [0.2, 0.3): 4 rows, mean p 0.2, observed 1.0 -> |0.2 - 1.0| = 0.8
    # bin [0.9, 1.0]: 2 rows (1.0 lands in the last bin), mean p 0.95, observed 0.5 -> 0.45
    # ECE = (4 * 0.8 + 2 * 0.45) / 6 = 4.1 / 6
    assert m.expected_calibration_error(y, p) == pytest.approx(4.1 / 6)
    mean_p, observed, count = m.calibration_curve(y, p)
    np.testing.assert_allclose(mean_p, [0.2, 0.95])
    np.testing.assert_allclose(observed, [1.0, 0.5])
    assert count.tolist() == [4, 2]


def test_bin_edges_are_closed_on_the_left():
    # 0.1 starts bin [0.1, 0.2); 0.0999 stays in [0, 0.1)
    _, _, count = m.calibration_curve([0, 1, 1], [0.0999, 0.1, 0.1999])
    assert count.tolist() == [1, 2]
    _, _, count = m.calibration_curve([0, 1], [0.0, 1.0], bins=1)
    assert count.tolist() == [2]


def test_calibration_curve_equals_sklearn_on_continuous_scores():
    y, p = _binary_case(11, 5000, tied=False)
    y = (np.random.default_rng(12).random(5000) < p).astype(int)
    mean_p, observed, _ = m.calibration_curve(y, p, bins=8)
    sk_observed, sk_mean_p = skcal.calibration_curve(y, p, n_bins=8, strategy="uniform")
    np.testing.assert_allclose(mean_p, sk_mean_p, atol=1e-12)
    np.testing.assert_allclose(observed, sk_observed, atol=1e-12)


def test_binary_metrics_dict():
    y, p = _binary_case(5, 300, tied=False)
    result = m.binary_metrics(y, p)
    assert set(result) == {"auc", "pr_auc", "log_loss", "ece", "n", "positives"}
    assert result["n"] == 300 and result["positives"] == int(np.sum(y))
    assert result["auc"] == m.roc_auc(y, p) and result["ece"] == m.expected_calibration_error(y, p)


# --- multiclass --------------------------------------------------------------------------------


def test_multiclass_equal_sklearn():
    rng = np.random.default_rng(21)
    classes = 7
    y = rng.integers(0, classes, 800)
    scores = rng.random((800, classes))
    assert m.accuracy(y, scores) == pytest.approx(sk.accuracy_score(y, scores.argmax(axis=1)))
    for k in (1, 2, 3, 6):
        expected = sk.top_k_accuracy_score(y, scores, k=k, labels=np.arange(classes))
        assert m.top_k_accuracy(y, scores, k=k) == pytest.approx(expected), k
    result = m.multiclass_metrics(y, scores)
    assert result == {"accuracy": m.accuracy(y, scores), "top3_accuracy": m.top_k_accuracy(y, scores, 3), "n": 800}


def test_top_k_ties_follow_argmax():
    # row 0: classes 0 and 1 tie at 0.5; argmax picks class 0, so true class 1 misses top-1 and hits top-2
    # row 1: the true class 2 is the strict maximum
    y = [1, 2]
    scores = [[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]]
    assert m.accuracy(y, scores) == 0.5
    assert m.top_k_accuracy(y, scores, k=1) == 0.5
    assert m.top_k_accuracy(y, scores, k=2) == 1.0
    tied = np.random.default_rng(3).integers(0, 3, (500, 5)).astype(float)
    labels = np.random.default_rng(4).integers(0, 5, 500)
    assert m.top_k_accuracy(labels, tied, k=1) == m.accuracy(labels, tied)


# --- ranking -----------------------------------------------------------------------------------

RANKED = [["a", "b", "c", "d"], ["x", "y", "z", "w"], ["p", "q", "r", "s"], ["m", "n", "o", "u"]]
RELEVANT = [{"a", "c"}, {"w"}, {"q", "r", "zz"}, set()]  # the fourth user has nothing relevant: skipped
L3 = math.log2(3)
# k = 3, per user (gains over the top 3; discount 1/log2(rank + 1)):
#   user 1: gains 1 0 1   |rel| 2  hit 1  recall 2/2  precision 2/3
#           DCG = 1 + 1/log2(4) = 1.5; IDCG (min(2, 3) = 2 hits) = 1 + 1/log2(3); NDCG = 1.5 / (1 + 1/L3)
#           AP@3 = (1/1 + 2/3) / min(2, 3) = 5/6; RR = 1
#   user 2: gains 0 0 0   |rel| 1  all zero at 3; 'w' is at rank 4, so RR = 1/4 (MRR uses the full ranking)
#   user 3: gains 0 1 1   |rel| 3  hit 1  recall 2/3  precision 2/3
#           DCG = 1/L3 + 1/2; IDCG (3 hits) = 1 + 1/L3 + 1/2; NDCG = (1/L3 + 0.5) / (1.5 + 1/L3)
#           AP@3 = (1/2 + 2/3) / min(3, 3) = 7/18; RR = 1/2
HAND_AT_3 = {
    "hr@3": 2 / 3,
    "recall@3": (1 + 0 + 2 / 3) / 3,  # 5/9
    "precision@3": (2 / 3 + 0 + 2 / 3) / 3,  # 4/9
    "ndcg@3": (1.5 / (1 + 1 / L3) + 0 + (1 / L3 + 0.5) / (1.5 + 1 / L3)) / 3,
    "map@3": (5 / 6 + 0 + 7 / 18) / 3,  # 11/27
    "mrr": (1 + 1 / 4 + 1 / 2) / 3,  # 7/12
    "users": 3,
}


def test_ranking_by_hand():
    assert m.hit_rate_at_k(RANKED, RELEVANT, 3) == pytest.approx(HAND_AT_3["hr@3"])
    assert m.recall_at_k(RANKED, RELEVANT, 3) == pytest.approx(5 / 9)
    assert m.precision_at_k(RANKED, RELEVANT, 3) == pytest.approx(4 / 9)
    assert m.ndcg_at_k(RANKED, RELEVANT, 3) == pytest.approx(HAND_AT_3["ndcg@3"])
    assert m.map_at_k(RANKED, RELEVANT, 3) == pytest.approx(11 / 27)
    assert m.mrr(RANKED, RELEVANT) == pytest.approx(7 / 12)
    assert m.average_precision_at_k(RANKED[2], RELEVANT[2], 3) == pytest.approx(7 / 18)
    result = m.ranking_metrics(RANKED, RELEVANT, ks=(3,))
    assert {k: v for k, v in result.items() if not k.endswith("_se")} == pytest.approx(HAND_AT_3)
    # standard errors over the three users with something relevant: hr@3 is 1, 0, 1; reciprocal ranks 1, 1/4, 1/2
    assert result["hr@3_se"] == pytest.approx(np.std([1, 0, 1], ddof=1) / np.sqrt(3))
    assert result["mrr_se"] == pytest.approx(np.std([1, 1 / 4, 1 / 2], ddof=1) / np.sqrt(3))


def test_ranking_metrics_keys_and_consistency():
    result = m.ranking_metrics(RANKED, RELEVANT)
    expected_keys = {f"{name}@{k}" for name in ("hr", "recall", "precision", "ndcg", "map") for k in (5, 10, 20)}
    assert set(result) == expected_keys | {f"{k}_se" for k in expected_keys} | {"mrr", "mrr_se", "users"}
    # k beyond the ranking length: every relevant item ranked counts, precision still divides by k
    assert result["recall@10"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert result["precision@10"] == pytest.approx((2 + 1 + 2) / 10 / 3)
    assert result["ndcg@5"] == pytest.approx(m.ndcg_at_k(RANKED, RELEVANT, 5))


def test_average_precision_normalises_by_min_of_relevant_and_k():
    # 5 relevant items, k = 2, both top slots relevant: (1/1 + 2/2) / min(5, 2) = 1.0 (not 2/5)
    ranking, relevant = ["a", "b", "x", "c"], {"a", "b", "c", "d", "e"}
    assert m.average_precision_at_k(ranking, relevant, 2) == pytest.approx(1.0)
    # k = 4: (1/1 + 2/2 + 3/4) / min(5, 4) = 2.75 / 4
    assert m.map_at_k([ranking], [relevant], 4) == pytest.approx(2.75 / 4)
    # NDCG the same way: 2 hits in 2 slots is the ideal, whatever |relevant| is
    assert m.ndcg_at_k([ranking], [relevant], 2) == pytest.approx(1.0)


def test_repeated_item_counts_once():
    # 'a' twice in the top 3 is one hit: precision 1/3, not 2/3; AP@3 = (1/1) / min(1, 3)
    assert m.precision_at_k([["a", "a", "b"]], [{"a"}], 3) == pytest.approx(1 / 3)
    assert m.average_precision_at_k(["a", "a", "b"], {"a"}, 3) == pytest.approx(1.0)


def test_ranking_accepts_2d_integer_arrays():
    ranked = np.array([[3, 1, 2], [0, 2, 1]])
    assert m.hit_rate_at_k(ranked, [{1}, {5}], 2) == pytest.approx(0.5)
    assert m.mrr(ranked, [{2}, {1}]) == pytest.approx((1 / 3 + 1 / 3) / 2)


def _ranking_case(seed: int, users: int = 60, items: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = (rng.random((users, items)) < 0.15).astype(int)
    truth[np.arange(users), rng.integers(0, items, users)] = 1  # at least one relevant item each
    return truth, rng.random((users, items))  # continuous scores: no ties


@pytest.mark.parametrize("k", [1, 5, 10, 30])
def test_ndcg_equals_sklearn(k):
    truth, scores = _ranking_case(31)
    ranked = np.argsort(-scores, axis=1)
    relevant = [set(np.flatnonzero(row).tolist()) for row in truth]
    assert m.ndcg_at_k(ranked, relevant, k) == pytest.approx(sk.ndcg_score(truth, scores, k=k), abs=1e-12)


def test_map_over_full_ranking_equals_sklearn_average_precision():
    # with k = every item, min(|rel|, k) = |rel|, which is sklearn's per-user average precision
    truth, scores = _ranking_case(41)
    ranked = np.argsort(-scores, axis=1)
    relevant = [set(np.flatnonzero(row).tolist()) for row in truth]
    expected = np.mean([sk.average_precision_score(t, s) for t, s in zip(truth, scores)])
    assert m.map_at_k(ranked, relevant, truth.shape[1]) == pytest.approx(expected, abs=1e-12)


# --- bad input ---------------------------------------------------------------------------------

BINARY = [m.roc_auc, m.pr_auc, m.log_loss, m.expected_calibration_error, m.calibration_curve, m.binary_metrics]


@pytest.mark.parametrize("fn", BINARY, ids=lambda f: f.__name__)
def test_binary_refuses_bad_input(fn):
    with pytest.raises(ValueError, match=r"differ in length \(3 vs 2\)"):
        fn([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="empty input"):
        fn([], [])
    with pytest.raises(ValueError, match="0/1 labels"):
        fn([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        fn([0, 1], [0.1, np.nan])


def test_single_class_is_refused_with_counts():
    with pytest.raises(ValueError, match=r"3 positive\(s\) and 0 negative\(s\)"):
        m.roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="at least one positive, got 0 of 2"):
        m.pr_auc([0, 0], [0.2, 0.5])


def test_probabilities_outside_unit_interval_are_refused():
    for fn in (m.log_loss, m.expected_calibration_error):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            fn([0, 1], [-0.1, 0.5])
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        m.expected_calibration_error([0, 1], [0.1, 0.5], bins=0)


@pytest.mark.parametrize("fn", [m.accuracy, m.top_k_accuracy, m.multiclass_metrics], ids=lambda f: f.__name__)
def test_multiclass_refuses_bad_input(fn):
    with pytest.raises(ValueError, match=r"differ in length \(1 vs 2\)"):
        fn([0], [[0.1, 0.9], [0.5, 0.5]])
    with pytest.raises(ValueError, match="empty input"):
        fn([], np.empty((0, 3)))
    with pytest.raises(ValueError, match=r"class indices 0\.\.1"):
        fn([2], [[0.1, 0.9]])
    with pytest.raises(ValueError, match="proba 2-D"):
        fn([0, 1], [0.1, 0.9])


RANKING = [m.hit_rate_at_k, m.recall_at_k, m.precision_at_k, m.ndcg_at_k, m.map_at_k]


@pytest.mark.parametrize("fn", RANKING, ids=lambda f: f.__name__)
def test_ranking_refuses_bad_input(fn):
    with pytest.raises(ValueError, match=r"ranked has 2 user\(s\), relevant has 1"):
        fn([["a"], ["b"]], [{"a"}], 1)
    with pytest.raises(ValueError, match="empty input"):
        fn([], [], 1)
    with pytest.raises(ValueError, match=r"all 2 user\(s\) have an empty relevant set"):
        fn([["a"], ["b"]], [set(), set()], 1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        fn([["a"]], [{"a"}], 0)


def test_other_ranking_entry_points_refuse_bad_input():
    with pytest.raises(ValueError, match="empty relevant set"):
        m.mrr([["a"]], [set()])
    with pytest.raises(ValueError, match="the relevant set is empty"):
        m.average_precision_at_k(["a"], set(), 1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        m.ranking_metrics([["a"]], [{"a"}], ks=(5, -1))
    with pytest.raises(ValueError, match="ranked must be 2-D"):
        m.mrr(np.array(["a", "b"]), [{"a"}, {"b"}])


def test_roc_auc_se_matches_the_spread_of_aucs_over_repeated_samples():
    # exponential scores (the model Hanley & McNeil's approximation assumes): the formula's SE is the
    # standard deviation of the AUC over 400 independent samples of 60 positives and 90 negatives, to 15%
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(60), np.zeros(90)]
    aucs = [m.roc_auc(y, np.r_[rng.exponential(2.5, 60), rng.exponential(1.0, 90)]) for _ in range(400)]
    se = m.roc_auc_se(float(np.mean(aucs)), 60, 90)
    assert se == pytest.approx(np.std(aucs, ddof=1), rel=0.15)
    assert m.roc_auc_se(0.8, 600, 900) < se / 3  # 10 times the users: about a third
    assert m.roc_auc_se(0.8, 0, 10) == 0.0
