"""The training driver's steps, in-process on CPU without TorchDistributor (one rank): a tiny snapshot
written with pyarrow, the typed job, build, the epoch loop and early stopping, the head choice, the
artifact and its metrics.json. Fast: no Spark."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from userlens.models.contracts import (
    FeatureSpec,
    ModelConfig,
    ModelMetrics,
    TrainingData,
    TrainingInfo,
    TrainJob,
    TrainSummary,
)
from userlens.models.storage import exists, read_json
from userlens.models.training import Fit, _Best, build, choose_heads, fit_epochs, init_process, train_main

EMB, FEAT = 4, 3
TASKS = ["purchase", "churn", "next_category"]


def write_snapshot(root: Path, rows: dict[str, int], seed: int = 0) -> None:
    """split=train|valid|test folders of users whose purchase follows the first embedding coordinate."""
    rng = np.random.default_rng(seed)
    for split, n in rows.items():
        emb = rng.normal(size=(n, EMB)).astype(np.float32)
        purchase = (emb[:, 0] > 0).astype(np.int64)
        table = pa.table(
            {
                "embedding": pa.array(emb.tolist(), pa.list_(pa.float32())),
                "features": pa.array(rng.uniform(0, 5, size=(n, FEAT)).tolist(), pa.list_(pa.float64())),
                "purchase": purchase,
                "churn": 1 - purchase,
                "next_category": np.where(purchase == 1, rng.integers(0, 2, n), -1).astype(np.int64),
            }
        )
        (root / f"split={split}").mkdir(parents=True)
        pq.write_table(table, root / f"split={split}" / "part-0.parquet")


def make_job(tmp_path: Path, **changes: object) -> TrainJob:
    write_snapshot(tmp_path / "snapshot", {"train": 96, "valid": 48, "test": 48})
    config = ModelConfig(
        tasks=TASKS, classes=["books", "pets"], hidden=[8], dropout=0.0, input_dim=EMB + FEAT, numeric_dim=FEAT
    )
    features = FeatureSpec([f"f{i}" for i in range(FEAT)], [0.0] * FEAT, [1.0] * FEAT, EMB, "test-encoder")
    data = TrainingData("2026-10-21", "2026-10-14", 7, {"train": {"users": 96}}, "test-encoder")
    job = TrainJob(
        snapshot=str(tmp_path / "snapshot"),
        snapshot_id="s1",
        artifact=str(tmp_path / "model"),
        version="v1",
        config=config,
        features=features,
        data=data,
        batch_size=32,
        epochs=30,
        patience=2,
        learning_rate=0.05,
        weight_decay=0.0,
        seed=3,
        torch_threads=1,
    )
    return replace(job, **changes)


def test_the_job_is_typed_and_pickles(tmp_path):
    job = make_job(tmp_path)
    assert pickle.loads(pickle.dumps(job)) == job  # what TorchDistributor ships to every rank
    with pytest.raises(TypeError, match="batchsize"):
        TrainJob(**{**job.__dict__, "batchsize": 8})  # a misspelt key fails where the job is written


def test_one_process_on_cpu(tmp_path):
    process = init_process(make_job(tmp_path), environ={})
    assert (process.rank, process.world, str(process.device), process.distributed) == (0, 1, "cpu", False)


def test_build_and_fit_stop_early_and_checkpoint(tmp_path):
    job = make_job(tmp_path)
    process = init_process(job, environ={})
    setup = build(job, process)
    assert setup.steps == math.ceil(96 / 32) and setup.parts == ("tasks",) and setup.fallback == {}
    fit = fit_epochs(job, process, setup)
    best = fit.best["tasks"]
    # stopped by patience (not by running out of epochs), keeping the best epoch's weights
    assert len(fit.history) < job.epochs and best.bad >= job.patience
    assert len(fit.history) == best.epoch + 1 + job.patience
    assert best.loss == min(h["valid_loss"] for h in fit.history)
    assert fit.samples == len(fit.history) * 96
    assert exists(f"{job.artifact}/checkpoints/last.pt")
    # the loss went down: the trunk learned the planted signal
    assert fit.history[best.epoch]["valid_loss"] < fit.history[0]["valid_loss"]


def test_choose_heads_keeps_the_baseline_only_where_it_validated_better():
    best = _Best()
    best.update(
        0, 1.0, {"trunk.w": torch.ones(1), "heads.purchase.weight": torch.ones(1), "heads.churn.weight": torch.ones(1)}
    )
    fit = Fit([{"valid_loss_purchase": 0.40, "valid_loss_churn": 0.30}], {"tasks": best}, 10, 1.0)
    fallback = {
        "purchase": (0.35, {"heads.purchase.weight": torch.zeros(1)}, "state probe"),  # better than 0.40: kept
        "churn": (0.31, {"heads.churn.weight": torch.zeros(1)}, "baseline"),
    }  # worse than 0.30: not
    state, heads = choose_heads(fit, fallback)
    assert heads == {"purchase": "state probe", "churn": "trained"}
    assert float(state["heads.purchase.weight"]) == 0.0 and float(state["heads.churn.weight"]) == 1.0
    assert float(state["trunk.w"]) == 1.0


def test_train_main_in_process_writes_an_artifact_whose_metrics_match_the_summary(tmp_path):
    job = make_job(tmp_path, epochs=4, patience=4)
    summary = train_main(job)
    assert isinstance(summary, TrainSummary) and isinstance(summary.training, TrainingInfo)
    assert summary.training.world_size == 1 and summary.training.epochs_run == 4
    metrics = ModelMetrics.from_json(read_json(f"{job.artifact}/metrics.json"))
    assert metrics.training == summary.training and metrics.model == summary.test
    assert metrics.data == job.data and metrics.version == "v1" and len(metrics.history) == 4
    assert set(summary.test) == set(TASKS) and 0.0 <= summary.test["purchase"]["auc"] <= 1.0
    assert exists(f"{job.artifact}/model.json") and exists(f"{job.artifact}/test_predictions.npz")


def test_metrics_json_refuses_a_missing_key():
    with pytest.raises(ValueError, match="metrics.json: 'training'"):
        ModelMetrics.from_json(
            {
                "version": "v",
                "snapshot_id": "s",
                "model": {},
                "baseline": {},
                "data": {"as_of_date": "", "cutoff": "", "horizon_days": 1, "splits": {}, "embed_model_id": ""},
            }
        )


def test_the_input_row_follows_the_views_and_a_missing_state_reads_zeros(tmp_path):
    from userlens.models.contracts import vectors_of
    from userlens.models.training import ShardReader

    history = np.arange(8, dtype=np.float32).reshape(2, EMB)
    state = pa.array([[1.0, 2.0, 3.0, 4.0], None], pa.list_(pa.float32()))
    raw = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    spec = FeatureSpec([f"f{i}" for i in range(FEAT)], [0.0] * FEAT, [1.0] * FEAT, EMB, "e", ["history", "state"], EMB)
    read = vectors_of(state, 2, EMB)
    assert np.isnan(read[1]).all() and read[0].tolist() == [1.0, 2.0, 3.0, 4.0]
    x = spec.inputs(history, read, raw)
    assert x.shape == (2, spec.input_dim) == (2, 2 * EMB + FEAT)
    assert x[0, EMB : 2 * EMB].tolist() == [1.0, 2.0, 3.0, 4.0] and not x[1, EMB : 2 * EMB].any()
    np.testing.assert_allclose(x[:, 2 * EMB :], np.log1p(raw), rtol=1e-6)
    only_state = replace(spec, views=["state"])
    assert only_state.input_dim == EMB + FEAT and only_state.inputs(None, read, raw)[0, :EMB].tolist() == [1, 2, 3, 4]

    # the training reader builds the same rows from a snapshot with a state_embedding column
    (tmp_path / "s").mkdir()
    pq.write_table(
        pa.table(
            {
                "embedding": pa.array(history.tolist(), pa.list_(pa.float32())),
                "state_embedding": state,
                "features": pa.array(raw.tolist(), pa.list_(pa.float64())),
                "purchase": np.array([0, 1]),
            }
        ),
        tmp_path / "s" / "part-0.parquet",
    )
    batch = next(ShardReader([str(tmp_path / "s" / "part-0.parquet")], spec, ["purchase"]).batches(8, None))
    np.testing.assert_array_equal(batch["x"], x)


def test_each_head_starts_from_the_linear_candidate_that_validates_best(tmp_path):
    """The wide path reads the embedding here (as it reads the state embedding in the stage): a probe that
    weighs its first coordinate, where the planted purchase signal is, beats the counts-only baseline for
    purchase; a probe with the wrong sign does not, and the baseline stays that task's candidate."""
    base = make_job(tmp_path)
    config = replace(base.config, numeric_dim=EMB + FEAT)
    zeros = {"weight": [[0.0] * FEAT], "bias": [0.0]}
    baseline = {"purchase": zeros, "churn": zeros}
    good = [[4.0] + [0.0] * (EMB - 1 + FEAT)]
    probe = {
        "purchase": {"weight": good, "bias": [0.0]},
        "churn": {"weight": [[-4.0] + [0.0] * (EMB - 1 + FEAT)], "bias": [0.0]},
    }
    wrong = {"purchase": {"weight": [[-4.0] + [0.0] * (EMB - 1 + FEAT)], "bias": [0.0]}}
    for probes, expected in (
        (probe, {"purchase": "state probe", "churn": "state probe"}),
        (wrong, {"purchase": "baseline", "churn": "baseline"}),
    ):
        job = replace(base, config=config, baseline_heads=baseline, probe_heads=probes)
        setup = build(job, init_process(job, environ={}))
        assert {task: name for task, (_, _, name) in setup.fallback.items()} == expected
        assert all(loss > 0 for loss, _, _ in setup.fallback.values())
    # the chosen head's weights are the probe's, on the last columns of the input (the wide path)
    weight = setup.fallback["purchase"][1]["heads.purchase.weight"]
    assert float(weight[0, -(EMB + FEAT)]) == 0.0  # (the last loop: the baseline, zero weights)
    job = replace(base, config=config, baseline_heads=None, probe_heads=probe)
    head = build(job, init_process(job, environ={})).fallback["purchase"][1]["heads.purchase.weight"]
    assert float(head[0, -(EMB + FEAT)]) == 4.0 and not head[0, : -(EMB + FEAT)].any()
