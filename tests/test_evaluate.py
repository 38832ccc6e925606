"""`userlens evaluate` pieces checked by hand: MRR from full-ranking ranks, the ranking engine, item-kNN."""
from __future__ import annotations

import math

import numpy as np
import pytest

from userlens.models import metrics as M
from userlens.models.baselines import ItemKNN, rank_batch


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
    scores = np.array([[0.5, 0.9, 0.5, -np.inf, 0.1],
                       [1.0, 1.0, 1.0, 1.0, np.nan]])
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
    np.testing.assert_allclose(ItemKNN(users, items, ts, 3, 3, None, neighbors=1).scores(np.array([0])),
                               [[2 / 3, 2 / 3, 0.0]])
    # half-life one day: user 0's item 0 is a day older than its item 1, so it weighs 1/2
    decayed = ItemKNN(users, items, ts, 3, 3, half_life_days=1.0)
    np.testing.assert_allclose(decayed.scores(np.array([0])), [[2 / 3, 1 / 3, 0.5 / 3 + 2 / 3]])
