"""The recommender's evaluation machinery on tiny data written here: settings chosen on validation only,
the fusion, EASE's size guard, the sequential encoder learning an order, the splits and the k-core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from userlens.eval.ranking import Fold, Method, Tuned, fuse, make_folds, tune
from userlens.models.ease import EASE, CatalogueTooLarge
from userlens.models.sequential import SequentialConfig, SequentialEncoder, fit


def tiny_frame(n_users: int = 40, n_items: int = 12, seed: int = 0) -> pd.DataFrame:
    """Users interact with items 0..3 of their 'taste' block and two random ones; splits by position."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        block = (u % 3) * 4
        items = [block, block + 1, block + 2, block + 3, *rng.choice(n_items, 2, replace=False)]
        items = list(dict.fromkeys(items))
        for t, i in enumerate(items):
            split = "test" if t == len(items) - 1 else "valid" if t == len(items) - 2 else "train"
            rows.append((f"u{u}", f"i{i}", t, u, int(i), split))
    return pd.DataFrame(rows, columns=["user", "item", "ts", "u", "i", "split"])


class Constant:
    """Scores every user the same: a fixed item order."""

    def __init__(self, order: np.ndarray) -> None:
        self.order = order

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.order.astype(float), (len(users), len(self.order))).copy()


def test_the_setting_is_chosen_on_validation_and_the_test_split_scored_once():
    frame = tiny_frame()
    folds = make_folds(frame, 40, 12)
    valid, test = folds
    seen_folds = []

    def fit_fold(fold: Fold, params):
        seen_folds.append((fold.name, params["which"]))
        good = np.zeros(fold.n_items)
        targets = np.concatenate(valid.targets)  # the setting "valid" ranks the validation targets first
        good[np.bincount(targets, minlength=fold.n_items).argsort()[::-1][:4]] = 1.0
        return Constant(good if params["which"] == "valid" else -good)

    row = tune(Method("m", [{"which": "other"}, {"which": "valid"}], fit_fold), folds, (3,), False, "ndcg@3").row
    assert row["setting"] == "which=valid"
    # every setting fitted on the validation fold, only the chosen one on the test fold
    assert seen_folds == [("valid", "other"), ("valid", "valid"), ("test", "valid")]
    assert row["valid"]["ndcg@3"] == max(v for _, v in row["grid"])
    assert 0 <= row["ndcg@3"] <= 1 and row["ndcg@3_se"] >= 0


def test_fusion_weights_come_from_validation_and_never_do_worse_there_than_the_lead():
    frame = tiny_frame()
    folds = make_folds(frame, 40, 12)

    def ease_fit(fold, params):
        return EASE(params["lam"]).fit(fold.fit["u"].to_numpy(), fold.fit["i"].to_numpy(), fold.n_users, fold.n_items)

    def pop_fit(fold, params):
        return Constant(np.bincount(fold.fit["i"], minlength=fold.n_items))

    components: dict[str, Tuned] = {
        "EASE": tune(Method("EASE", [{"lam": 1.0}, {"lam": 10.0}], ease_fit), folds, (3,), False, "ndcg@3"),
        "pop": tune(Method("pop", [{}], pop_fit), folds, (3,), False, "ndcg@3"),
    }
    fused = fuse(components, folds, (3,), False, "ndcg@3").row
    assert fused["valid"]["ndcg@3"] >= components["EASE"].row["valid"]["ndcg@3"] - 1e-9
    assert fused["setting"].startswith("EASE 1")


def test_ease_refuses_an_oversized_catalogue_in_one_line():
    with pytest.raises(CatalogueTooLarge) as caught:
        EASE(100.0, max_items=10).fit(np.array([0, 1]), np.array([3, 10]), 2, 11)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("EASE: 11 items need a dense 11 x 11 matrix")
    assert "train.recommend.ease_max_items=10" in message


def test_ease_learns_co_occurrence():
    users = np.repeat(np.arange(30), 2)
    items = np.tile([0, 1], 30)  # items 0 and 1 always together, item 2 never
    model = EASE(1.0).fit(np.r_[users, 30], np.r_[items, 0], 31, 3)
    s = model.scores(np.array([30]))  # a user with item 0 only
    assert s[0, 1] > s[0, 2]


def test_ease_with_values_is_the_closed_form_on_the_weighted_matrix():
    """EASE on a valued matrix (a rating as the strength): B = -P / diag(P), diag(B) = 0, P = (X'X + lam I)^-1
    with X the mean value of each (user, item); a user's scores are their row of X times B."""
    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 12, 60), rng.integers(0, 7, 60)
    values = rng.integers(1, 6, 60).astype(float)
    x = np.zeros((12, 7))
    for u, i in {(u, i) for u, i in zip(users, items)}:
        x[u, i] = values[(users == u) & (items == i)].mean()  # a repeated pair counts once, at its mean
    p = np.linalg.inv(x.T @ x + 5.0 * np.eye(7))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    model = EASE(5.0).fit(users, items, 12, 7, values)
    np.testing.assert_allclose(model.B.numpy(), b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.scores(np.arange(12)), x @ b, rtol=1e-4, atol=1e-5)
    # without values: the binary matrix
    binary = (x > 0).astype(float)
    p = np.linalg.inv(binary.T @ binary + 5.0 * np.eye(7))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(EASE(5.0).fit(users, items, 12, 7).B.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_a_rating_strength_is_tried_only_where_the_data_has_scores(spark):
    from conftest import make_settings
    from userlens.eval.evaluate import baseline_methods, pair_strength

    settings = make_settings(Path("/nonexistent"), "evaluate.als_reg_params=[0.1]", "evaluate.als_alphas=[1.0]")
    grids = {m.name: m.grid for m in baseline_methods(spark, settings, scored=True)}
    assert [g.get("strength", "count") for g in grids["ALS (Spark MLlib, implicit)"]] == ["count", "score"]
    assert {g.get("strength", "count") for g in grids["EASE"]} == {"count", "score"}
    unscored = {m.name: m.grid for m in baseline_methods(spark, settings, scored=False)}
    assert all("strength" not in g for grid in unscored.values() for g in grid)
    # a row without a score adds 1, as under "count"
    fold = Fold(
        "f", pd.DataFrame({"u": [0, 0, 1], "i": [0, 1, 0], "score": [4.0, None, 2.5]}), np.array([]), [], [], 2, 2
    )
    assert pair_strength(fold, "count") is None
    np.testing.assert_array_equal(pair_strength(fold, "score"), [4.0, 1.0, 2.5])


def test_the_sequential_encoder_learns_what_comes_next():
    n = 10
    histories = [np.array([(s + j) % n for j in range(8)]) for s in range(n) for _ in range(6)]
    model = SequentialEncoder(
        n, SequentialConfig(dim=16, layers=1, max_len=8, dropout=0.0, batch_size=16, learning_rate=1e-2)
    )
    summary = fit(model, histories, epochs=40)
    assert summary["epochs_run"] == 40
    scores = model.scores([np.array([3, 4, 5])])
    assert int(np.argmax(scores[0])) == 6  # the chain's next item


def test_early_stopping_keeps_the_best_validated_state():
    n = 6
    histories = [np.array([(s + j) % n for j in range(6)]) for s in range(n) for _ in range(4)]
    values = iter([0.1, 0.5, 0.2, 0.3, 0.1, 0.0, 0.0, 0.0])
    model = SequentialEncoder(
        n, SequentialConfig(dim=8, layers=1, max_len=6, validate_every=1, patience=3, max_epochs=30)
    )
    summary = fit(model, histories, validate=lambda m: next(values))
    assert summary["best_epoch"] == 2 and summary["best"] == 0.5 and summary["epochs_run"] == 5


def test_stratified_validation_comes_from_the_training_part_only(spark):
    from userlens.eval.evaluate import stratified_split, with_valid

    rows = [(f"u{u}", f"i{i}", i, f"e{u}-{i}") for u in range(20) for i in range(8)]
    inter = spark.createDataFrame(rows, "user string, item string, ts long, event_id string")
    before = {(r.user, r.item): r.split for r in stratified_split(inter, 0.75, 7).collect()}
    after = {(r.user, r.item): r.split for r in with_valid(stratified_split(inter, 0.75, 7), 0.75, 7).collect()}
    assert {k for k, v in after.items() if v == "test"} == {k for k, v in before.items() if v == "test"}
    assert all(before[k] == "train" for k, v in after.items() if v == "valid")
    per_user = pd.Series([v for v in after.values()]).groupby([k[0] for k in after]).value_counts().unstack()
    # 8 pairs: round(6) = 6 train, 2 test; of the 6, round(4.5) = 5 (half up) stay train, 1 is valid
    assert (per_user["test"] == 2).all() and (per_user["valid"] == 1).all() and (per_user["train"] == 5).all()


def test_k_core_iterates_until_every_user_and_item_has_k(spark):
    from userlens.eval.evaluate import k_core

    # i9 has 1 interaction; without it u3 has 1, without u3 i2 has 1: each goes in turn
    rows = [
        ("u1", "i1"),
        ("u1", "i2"),
        ("u1", "i3"),
        ("u2", "i1"),
        ("u2", "i3"),
        ("u2", "i4"),
        ("u4", "i1"),
        ("u4", "i3"),
        ("u4", "i4"),
        ("u3", "i2"),
        ("u3", "i9"),
    ]
    inter = spark.createDataFrame(rows, "user string, item string")
    kept = sorted((r.user, r.item) for r in k_core(inter, 2).collect())
    assert kept == [
        ("u1", "i1"),
        ("u1", "i3"),
        ("u2", "i1"),
        ("u2", "i3"),
        ("u2", "i4"),
        ("u4", "i1"),
        ("u4", "i3"),
        ("u4", "i4"),
    ]


def test_als_runs_past_its_checkpoint_interval_in_a_local_session(spark):
    """25 iterations: without a checkpoint directory MLlib ignores checkpointInterval and the lineage
    overflows the JVM stack (a StackOverflowError at 20 iterations on MovieLens 100K); the local session
    gets a temporary one, and the factors are finite."""
    from userlens.config import AlsSettings
    from userlens.eval.spark_baselines import fit_als

    rng = np.random.default_rng(4)
    rows = [(int(u), int(i), 1.0) for u, i in {(u, int(rng.integers(30))) for u in range(40) for _ in range(6)}]
    ratings = spark.createDataFrame(rows, "u int, i int, r float")
    model = fit_als(ratings, AlsSettings(rank=4, max_iter=25, reg_param=0.1, alpha=1.0), seed=3)
    assert spark.sparkContext.getCheckpointDir() is not None
    factors = np.stack(model.userFactors.toPandas()["features"].to_numpy())
    assert factors.shape == (40, 4) and np.isfinite(factors).all()


def test_the_cold_item_split_holds_out_whole_items_and_ranks_only_them(spark):
    """cold-items: a seeded fifth of the items loses every interaction from training (half valid-cold,
    half test-cold); both folds fit on the warm items only and rank only their own cold items, for users
    with a warm history."""
    from userlens.eval.evaluate import cold_items_split

    rng = np.random.default_rng(2)
    rows = [
        (f"u{u}", f"i{i}", int(t), f"e{u}-{i}-{t}")
        for u in range(60)
        for t, i in enumerate(rng.choice(200, 12, replace=False))
    ]
    inter = spark.createDataFrame(rows, "user string, item string, ts long, event_id string")
    split = cold_items_split(inter, 0.2, seed=7).toPandas()
    by_item = split.groupby("item")["split"].agg(set)
    assert (by_item.map(len) == 1).all()  # an item is wholly warm, valid-cold or test-cold
    kinds = by_item.map(lambda s: next(iter(s))).value_counts()
    cold_share = (kinds.get("valid", 0) + kinds.get("test", 0)) / len(by_item)
    assert 0.1 < cold_share < 0.3 and kinds.get("valid", 0) > 0 and kinds.get("test", 0) > 0
    again = cold_items_split(inter, 0.2, seed=7).toPandas()
    other = cold_items_split(inter, 0.2, seed=8).toPandas()
    key = ["user", "item"]
    assert split.sort_values(key)["split"].tolist() == again.sort_values(key)["split"].tolist()
    assert split.sort_values(key)["split"].tolist() != other.sort_values(key)["split"].tolist()

    items, users = pd.Index(sorted(split["item"].unique())), pd.Index(sorted(split["user"].unique()))
    frame = split.assign(u=users.get_indexer(split["user"]), i=items.get_indexer(split["item"]))
    for fold, held in zip(make_folds(frame, len(users), len(items), cold=True), ("valid", "test")):
        cold = set(frame.loc[frame["split"] == held, "i"])
        assert set(fold.candidates) == cold
        assert set(fold.fit["i"]).isdisjoint(cold) and set(fold.fit["i"]) == set(
            frame.loc[frame["split"] == "train", "i"]
        )
        assert len(fold.users) > 0 and all(len(s) > 0 for s in fold.seen)
        assert all(set(t) <= cold for t in fold.targets)


def test_id_dropout_drops_a_share_of_id_vectors_in_training_only():
    """With item texts, training steps see that share of the items by their text alone; scoring always
    sees every id vector; without texts nothing is dropped (there would be nothing left)."""
    n, rng = 400, np.random.default_rng(0)
    text = rng.normal(size=(n, 8)).astype(np.float32)
    model = SequentialEncoder(n, SequentialConfig(dim=8, id_dropout=0.5), text)
    with torch.no_grad():
        model.ids.weight.fill_(1.0)
        model.text_proj.weight.zero_()
        model.text_proj.bias.zero_()
    model.train()
    dropped = (model.token_matrix()[1:].abs().sum(1) == 0).float().mean().item()
    assert 0.4 < dropped < 0.6
    assert not torch.equal(model.token_matrix(), model.token_matrix())  # drawn afresh in each step
    model.eval()
    assert bool((model.token_matrix()[1:] == 1.0).all())
    ids_only = SequentialEncoder(n, SequentialConfig(dim=8, id_dropout=0.5))
    ids_only.train()
    assert bool((ids_only.token_matrix()[1:].abs().sum(1) > 0).all())


def test_new_items_are_ranked_by_their_text_alone():
    """Items fall in 5 text groups and a history moves from group g to group g + 1. Items 20..24 (one per
    group) never occur in training (no id vector, out of the softmax): among them the model ranks the next
    group's first, from the text projection it learned on the warm items (id dropout on, as cold-items
    may choose)."""
    n, groups = 25, 5
    rng = np.random.default_rng(1)
    text = np.eye(groups, dtype=np.float32)[np.arange(n) % groups] + 0.05 * rng.normal(size=(n, groups)).astype(
        np.float32
    )
    warm = np.arange(20)
    histories = []
    for _ in range(300):
        g = int(rng.integers(groups))
        histories.append(np.array([rng.choice(warm[warm % groups == (g + j) % groups]) for j in range(6)]))
    unknown = np.arange(n) >= 20
    config = SequentialConfig(dim=16, layers=1, max_len=6, dropout=0.0, learning_rate=1e-2, id_dropout=0.5)
    model = SequentialEncoder(n, config, text, unknown)
    fit(model, histories, epochs=30)
    cold = np.arange(20, 25)
    hits = 0
    for g in range(groups):
        history = np.array([(g - 2) % groups, (g - 1) % groups])  # warm items of groups g - 2 and g - 1
        scores = model.scores([history])[0]
        hits += int(cold[np.argmax(scores[cold])] % groups == g)
    assert hits == groups


def cold_frame() -> pd.DataFrame:
    """40 users with six warm items each (of 0..19); items 20..23 are valid-cold and 24..27 test-cold, and a
    user's cold item follows their taste block (u % 4 -> 20 + u % 4 and 24 + u % 4)."""
    rows = []
    for u in range(40):
        block = (u % 4) * 5
        for t, i in enumerate(range(block, block + 5)):
            rows.append((f"u{u}", f"i{i}", t, u, i, "train"))
        rows.append((f"u{u}", f"i{20 + u % 4}", 6, u, 20 + u % 4, "valid"))
        rows.append((f"u{u}", f"i{24 + u % 4}", 7, u, 24 + u % 4, "test"))
    return pd.DataFrame(rows, columns=["user", "item", "ts", "u", "i", "split"])


def test_cold_scores_are_standardised_over_the_candidates_only():
    from userlens.eval.ranking import normalised

    scores = np.array([[100.0, -50.0, 1.0, 2.0, 3.0]])
    out = normalised(scores, [np.array([4])], candidates=np.array([2, 3, 4])).numpy()[0]
    assert np.isneginf(out[[0, 1, 4]]).all()  # outside the candidates, or seen
    assert out[2] == pytest.approx(-1.0) and out[3] == pytest.approx(1.0)  # over items 2 and 3 alone


def test_the_cold_userlens_row_is_fused_on_validation_and_never_below_its_best_component_there():
    """cold-items' userlens row fuses the sequential component with text cosine: the lead is the best on
    validation, and the validation value of the fusion is at least the lead's."""
    from userlens.eval.recommenders import COLD_SEQUENTIAL, COLD_TEXT, cold_fused_row

    frame = cold_frame()
    folds = make_folds(frame, 40, 28, cold=True)
    rng = np.random.default_rng(3)
    right = np.zeros((40, 28))
    right[np.arange(40), 20 + np.arange(40) % 4] = 1.0
    right[np.arange(40), 24 + np.arange(40) % 4] = 1.0

    class Noisy:
        def __init__(self, signal: float) -> None:
            self.s = signal * right + rng.normal(size=right.shape)

        def scores(self, users: np.ndarray) -> np.ndarray:
            return self.s[users]

    components = {
        COLD_SEQUENTIAL: tune(Method(COLD_SEQUENTIAL, [{}], lambda f, p: Noisy(0.5)), folds, (2,), False, "ndcg@2"),
        COLD_TEXT: tune(Method(COLD_TEXT, [{}], lambda f, p: Noisy(1.5)), folds, (2,), False, "ndcg@2"),
    }
    row = cold_fused_row(components, folds, (2,), "ndcg@2", seed=1)["userlens"]
    lead = max(components, key=lambda n: components[n].row["valid"]["ndcg@2"])
    assert row["setting"].startswith(f"{lead} 1")
    assert row["valid"]["ndcg@2"] >= components[lead].row["valid"]["ndcg@2"] - 1e-9
    assert cold_fused_row({COLD_TEXT: components[COLD_TEXT]}, folds, (2,), "ndcg@2", seed=1) == {}
