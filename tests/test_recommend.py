"""The two-tower head's pieces without Spark: list columns to index matrices, positive sampling, the
logQ-corrected in-batch softmax, top-K with exclusions, and a fit that learns a pattern popularity cannot."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from userlens.config import load_settings
from userlens.models.recommend import (
    RecConfig,
    TextTwoTower,
    TwoTower,
    list_column,
    padded_indices,
    recency_weights,
    sample_positive,
    top_k,
)


def test_list_columns_become_padded_index_matrices():
    column = pa.array([["b", "a", "zz"], None, [], ["c", "a", "b", "a"]], pa.list_(pa.string()))
    values, lengths = list_column(column.slice(0))
    assert lengths.tolist() == [3, 0, 0, 4]
    lookup = pd.Index(["a", "b", "c"])
    m = padded_indices(values, lengths, lookup, width=3, pad=3)
    # unknown "zz" -> pad; rows cut at the width; empty and null rows all pad
    assert m.tolist() == [[1, 0, 3], [3, 3, 3], [3, 3, 3], [2, 0, 1]]
    sliced_values, sliced_lengths = list_column(column.slice(3))
    assert padded_indices(sliced_values, sliced_lengths, lookup, 2, 3).tolist() == [[2, 0]]


def test_recency_weights_halve_per_half_life_and_ignore_padding():
    idx = np.array([[0, 1, 5]])
    w = recency_weights(np.array([[0.0, 14.0, 3.0]]), idx, pad=5, half_life_days=14.0)
    assert w.tolist() == [[1.0, 0.5, 0.0]]


def test_sample_positive_picks_only_real_items():
    rng = np.random.default_rng(0)
    rows = np.array([[4, 9, 9], [9, 9, 9], [2, 9, 7]])
    picks = np.array([sample_positive(rows, 9, rng) for _ in range(200)])
    assert set(picks[:, 0]) == {4} and set(picks[:, 1]) == {9} and set(picks[:, 2]) == {2, 7}


def test_in_batch_logits_correct_for_popularity_and_never_use_an_item_as_its_own_negative():
    config = RecConfig(n_items=4, item_dim=3, user_dim=0, dim=2, hidden=4, history=2)
    log_q = np.log(np.array([0.7, 0.1, 0.1, 0.1]))
    model = TwoTower(config, np.eye(4, 3, dtype=np.float32), log_q)
    users = torch.randn(5, 2)
    positives = torch.tensor([0, 4, 2, 0, 1])  # row 1 has no positive (pad)
    logits, targets = model.in_batch(users, positives)
    assert logits.shape == (4, 4) and targets.tolist() == [0, 1, 2, 3]
    # kept rows 0 and 2 share item 0: each is masked in the other's row, never on the diagonal
    assert torch.isinf(logits[0, 2]) and torch.isinf(logits[2, 0]) and not torch.isinf(logits.diagonal()).any()
    kept = [0, 2, 0, 1]
    v, b = model.item_vectors(model.item_text[kept], torch.tensor(kept))
    raw = users[[0, 2, 3, 4]] @ v.T + b
    assert torch.allclose(logits[1, 2], raw[1, 2] - float(log_q[0]))


def test_top_k_excludes_and_pads_when_candidates_run_out():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = (torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0]]), torch.zeros(3))
    exclude = np.array([[0, -1], [2, 1]])
    top = top_k(users, items, exclude, k=3)
    assert top[0].tolist() == [1, 2, -1]  # item 0 excluded, only two left
    assert top[1].tolist() == [0, -1, -1]


def test_text_two_tower_learns_what_comes_next():
    """Each user walks the catalogue in order (i, i+1, ...): popularity cannot predict the next item,
    a model of the history can. Leave-last-out hit rate@5, seen items excluded."""
    rng = np.random.default_rng(1)
    n_items, rows = 40, []
    for u in range(240):
        start = int(rng.integers(n_items))
        rows += [(f"u{u}", f"i{(start + t) % n_items}", 1_000 + t * 86_400) for t in range(9)]
    df = pd.DataFrame(rows, columns=["user", "item", "ts"])
    train, test = df.groupby("user").head(8), df.groupby("user").tail(1)
    settings = load_settings(None, ["train.recommend.dim=32", "train.recommend.hidden=64"])
    model = TextTwoTower(settings, epochs=15).fit(train, None)
    seen = {u: set(g["item"]) for u, g in train.groupby("user")}
    recs = model.recommend(list(test["user"]), 5, seen)
    hit = np.mean([row.item in recs[row.user] for row in test.itertuples()])
    counts = train["item"].value_counts()
    popular = [i for i in counts.index]
    pop_hit = np.mean([row.item in [i for i in popular if i not in seen[row.user]][:5] for row in test.itertuples()])
    assert all(len(r) == 5 and not set(r) & seen[u] for u, r in recs.items())
    assert hit >= 0.5 and hit > pop_hit + 0.3, (hit, pop_hit)


def test_recommend_before_fit_is_an_error():
    with pytest.raises(ValueError, match="before fit"):
        TextTwoTower(load_settings(None, [])).recommend(["u"], 3)


def test_the_repeat_term_lifts_items_of_the_users_own_history():
    users = torch.zeros(2, 2)
    items = (torch.zeros(3, 2), torch.tensor([0.0, 0.1, 0.2]))  # without history: item 2 first
    hist = torch.tensor([[0, 3], [3, 3]])  # user 0 saw item 0; 3 = pad
    weights = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    top = top_k(users, items, np.full((2, 1), -1), k=3, repeat=(hist, weights, torch.tensor(1.0)))
    assert top[0].tolist() == [0, 2, 1] and top[1].tolist() == [2, 1, 0]
