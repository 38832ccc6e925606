"""The train stage on real Spark, real Delta, the real MiniLM and real TorchDistributor processes:
point-in-time features and labels (no leakage), the snapshot, DDP with 2 processes, the baseline,
the artifact round trip, DP-SGD, barrier mode, and the errors before training."""

from __future__ import annotations

import datetime as dt
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from conftest import SHORT_STATE, SHORT_TEXTS, STATE_ON, make_settings
from userlens.artifacts import ModelStore
from userlens.errors import ConfigError, UserlensError
from userlens.features import check_counts, cutoff, item_history, labelled_users
from userlens.models.als import FUSION_WEIGHTS
from userlens.models.contracts import FORMAT_VERSION
from userlens.models.predictor import load_artifact
from userlens.models.storage import list_files, write_json
from userlens.models.training import evaluate_files, evaluate_recommendations, serving_catalogue
from userlens.privacy import load_key
from userlens.runs import StageRun
from userlens.sample import SampleSpec, generate_sample
from userlens.stages.ingest import run_ingest
from userlens.stages.train import check_train_settings, run_train
from userlens.tables import Tables
from userlens.text.user_texts import build_user_texts

AS_OF = dt.date(2026, 10, 21)  # the sample's last day
SMALL = ["train.epochs=6", "train.patience=3", "train.batch_size=32", "train.min_users=40", SHORT_TEXTS, SHORT_STATE]


@pytest.fixture(scope="module")
def warehouse(spark, tmp_path_factory):
    """300 sample users over 21 days, ingested once for the whole module."""
    root = tmp_path_factory.mktemp("train")
    settings = make_settings(root)
    generate_sample(spark, settings.source.path, SampleSpec(users=300, days=21, items=150, seed=11))
    run_ingest(spark, settings, load_key(settings.privacy), StageRun("ingest", "r-ingest"), None, True)
    return root


def settings_for(warehouse: Path, tmp_path: Path, *overrides: str):
    """The module's warehouse with a fresh models folder per test."""
    return make_settings(warehouse, f"storage.models={tmp_path / 'models'}", *overrides)


def train(spark, settings):
    run = StageRun("train", run_id=f"run-{os.urandom(4).hex()}")
    return run_train(spark, settings, run, AS_OF), run


def frame_rows(df, cols):
    return {r["user_key"]: tuple(r[c] for c in cols) for r in df.select("user_key", *cols).collect()}


def test_no_leakage_across_the_cutoff(spark, warehouse):
    settings = make_settings(warehouse, *STATE_ON)
    events = Tables(spark, settings.storage).read("events")
    items = Tables(spark, settings.storage).read("items")
    cut = cutoff(AS_OF, settings.train.horizon_days)
    types = settings.ingest.event_types

    def inputs(ev):
        users = labelled_users(ev, cut, AS_OF, types, settings.train)
        texts = build_user_texts(ev.where(F.col("event_date") <= F.lit(cut)), items, settings.textualize, types, cut)
        return (
            frame_rows(users, ["features"]),
            frame_rows(texts, ["text_hash", "state_hash"]),
            frame_rows(users, ["purchase", "churn", "next_category_name"]),
        )

    features, texts, labels = inputs(events)
    assert len(features) > 200 and len(texts) == len(features)

    # the future rewritten: every event after the cutoff dropped, a purchase added for every user
    past = events.where(F.col("event_date") <= F.lit(cut))
    day_after = dt.datetime.combine(cut + dt.timedelta(days=1), dt.time(12))
    bought = (
        events.select("user_key")
        .distinct()
        .withColumn("event_id", F.concat(F.lit("x"), F.col("user_key")))
        .withColumn("event_time", F.lit(day_after))
        .withColumn("event_date", F.lit(day_after.date()))
        .withColumn("event_type", F.lit("purchase"))
        .withColumn("item_id", F.lit("i00001"))
        .withColumn("category", F.lit("pets"))
        .withColumn("price", F.lit(9.5))
        .withColumn("quantity", F.lit(1))
        .withColumn("query", F.lit(None).cast("string"))
        .withColumn("text", F.lit(None).cast("string"))
        .withColumn("run_id", F.lit("x"))
    )
    f2, t2, l2 = inputs(past.unionByName(bought))
    assert f2 == features, "features changed when only events after the cutoff changed"
    assert t2 == texts, "texts changed when only events after the cutoff changed"
    assert l2 != labels  # the perturbation did reach the labels, so the test can fail

    # the past rewritten: every other event up to the cutoff dropped
    thinned = events.where((F.col("event_date") > F.lit(cut)) | (F.xxhash64("event_id") % 2 == 0))
    f3, _, l3 = inputs(thinned)
    common = set(l3) & set(labels)
    assert len(common) > 200
    assert {u: l3[u] for u in common} == {u: labels[u] for u in common}, (
        "labels changed when only events up to the cutoff changed"
    )
    assert any(f3[u] != features[u] for u in common)  # the perturbation did reach the features


def test_two_process_ddp_run_writes_an_artifact_that_reproduces_its_metrics(spark, warehouse, tmp_path):
    # the ALS baseline tuned as it ships (the other pipeline tests fit one setting: conftest.FIXED_ALS), over a
    # 2 x 1 grid instead of evaluate's 4 x 3 (12 ALS fits): the choice on validation is what is checked
    settings = settings_for(
        warehouse,
        tmp_path,
        *SMALL,
        "train.recommend.als.tune=true",
        "evaluate.als_reg_params=[0.1, 1.0]",
        "evaluate.als_alphas=[10.0]",
        "train.text_baseline=true",
        *STATE_ON,
        "train.linear_reg_params=[0.1, 1.0]",
    )
    result, run = train(spark, settings)

    assert result.cutoff == AS_OF - dt.timedelta(days=7)
    assert ModelStore.of(settings).latest() == result.version
    artifact = load_artifact(result.path)
    metrics = artifact.metrics
    assert metrics["training"]["world_size"] == 2
    assert set(metrics["model"]) == {"purchase", "churn", "next_category", "recommend"}
    words = {"purchase (bag of words)", "churn (bag of words)"}
    assert set(metrics["baseline"]) == {
        "purchase",
        "churn",
        "next_category",
        "recommend_popularity",
        "recommend_als",
        *words,
    }
    assert set(metrics["training"]["baseline_fallback"].values()) <= {"trained", "baseline"}  # no probe here
    for name in words:  # the second baseline: its regParam chosen on valid, scored on the same test users
        bow = metrics["baseline"][name]
        assert bow["reg_param"] in (0.1, 1.0) and 0.5 < bow["valid_auc"] <= 1.0 and 0.0 <= bow["auc"] <= 1.0
        assert bow["n"] == result.users["test"]
    for task in ("purchase", "churn"):
        for name in ("auc", "pr_auc", "log_loss", "ece"):
            assert 0.0 <= metrics["model"][task][name] and 0.0 <= metrics["baseline"][task][name]
        assert metrics["model"][task]["n"] == result.users["test"]
    assert 0.0 <= metrics["model"]["next_category"]["accuracy"] <= metrics["model"]["next_category"]["top3_accuracy"]
    assert (
        sum(result.users.values())
        == metrics["data"]["splits"]["train"]["users"]
        + metrics["data"]["splits"]["valid"]["users"]
        + metrics["data"]["splits"]["test"]["users"]
    )

    # every split has at least one file per training process, and the classes are the train split's
    snapshot = f"{settings.storage.models}/snapshots/{metrics['snapshot_id']}"
    for split in ("train", "valid", "test"):
        assert len(list_files(f"{snapshot}/split={split}")) >= 2
    assert len(artifact.config.classes) >= 2 and artifact.features.embedding_dim == 384
    # the model reads both views: the history and the state embedding, then the numeric features
    spec = artifact.features
    assert (spec.views, spec.state_dim) == (["history", "state"], 384)
    assert artifact.config.input_dim == 2 * 384 + len(spec.names) == spec.input_dim
    assert Path(result.path, "checkpoints", "last.pt").is_file()

    # the artifact, loaded back, gives the recorded test metrics
    test_files = list_files(f"{snapshot}/split=test")
    again = evaluate_files(artifact.model, artifact.config, artifact.features, test_files)
    rec = settings.train.recommend
    catalogue = serving_catalogue(artifact)
    # the recommender that ships is the head fused with the tuned ALS, its weight chosen on validation
    assert artifact.fusion is not None and artifact.fusion.weight in FUSION_WEIGHTS
    again["recommend"] = evaluate_recommendations(
        artifact.model, artifact.features, artifact.config.tasks, test_files, catalogue, rec.k, artifact.fusion
    )
    head = evaluate_recommendations(
        artifact.model, artifact.features, artifact.config.tasks, test_files, catalogue, rec.k
    )
    # (float32 matmuls over batches of other sizes than training's evaluation: equal to a few ulps)
    for task, values in metrics["model"].items():
        for name, value in values.items():
            if name in again[task]:
                assert again[task][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, name)
    assert metrics["model"]["recommend"]["als_weight"] == artifact.fusion.weight
    assert metrics["recommendations"]["userlens (sequential)"] == pytest.approx(head)
    assert set(metrics["recommendations"]) == {"userlens", "userlens (sequential)", "popularity", "ALS"}

    # the recommenders are evaluated side by side on the same test users
    k = rec.k
    two_tower, popularity, als = (
        metrics["model"]["recommend"],
        metrics["baseline"]["recommend_popularity"],
        metrics["baseline"]["recommend_als"],
    )
    assert two_tower["users"] == popularity["users"] == als["users"] > 10
    for m in (two_tower, popularity, als):
        assert 0.0 <= m[f"recall@{k}"] <= m[f"hit_rate@{k}"] <= 1.0 and 0.0 <= m[f"ndcg@{k}"] <= 1.0
    assert popularity[f"recall@{k}"] > 0.0  # the sample's buyers favour popular items
    # ALS: regParam and alpha chosen from evaluate's grid on the valid split's users, not the test users
    grid = {(r, a) for r in settings.evaluate.als_reg_params for a in settings.evaluate.als_alphas}
    assert (als["reg_param"], als["alpha"]) in grid and 0.0 <= als[f"valid_recall@{k}"] <= 1.0

    details = result.run_record().details  # what its pipeline_runs row holds
    assert details["version"] == result.version and details["world_size"] == 2
    # no user_embeddings in this warehouse: every distinct text as of the cutoff was embedded, once
    events = Tables(spark, settings.storage).read("events")
    users = labelled_users(events, result.cutoff, AS_OF, settings.ingest.event_types, settings.train)
    texts = build_user_texts(
        events.where(F.col("event_date") <= F.lit(result.cutoff)),
        Tables(spark, settings.storage).read("items"),
        settings.textualize,
        settings.ingest.event_types,
        result.cutoff,
    )
    joined = users.join(texts, "user_key")
    distinct = joined.select("text_hash").distinct().count() + joined.select("state_hash").distinct().count()
    assert details["cutoff_texts_embedded"] == distinct > 400
    assert 0.0 < details["cutoff_embed_seconds"] < details["snapshot_seconds"]
    assert details["model"]["churn"]["auc"] == metrics["model"]["churn"]["auc"]
    assert details["baseline"]["purchase"]["auc"] == metrics["baseline"]["purchase"]["auc"]


# DP-SGD end to end (epsilon in metrics.json, pipeline_runs, user_profiles and the report): the demo run of
# tests/test_privacy_check.py trains with train.dp.enabled=true


# local_mode=False (a barrier stage on the executors) is tested on a real standalone cluster, with two
# executors: tests/test_cluster_nightly.py


def test_too_few_users_fails_before_training(spark, warehouse, tmp_path):
    settings = settings_for(warehouse, tmp_path, "train.min_users=100000")
    with pytest.raises(UserlensError, match=r"only \d+ labelled users in the train split, below train.min_users="):
        train(spark, settings)
    assert ModelStore.of(settings).latest() is None
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").glob("2*"))


def test_single_class_label_names_the_task_and_counts(settings):
    counts = {s: {"users": 100, "purchase": 30, "churn": 0, "next_category": 60} for s in ("train", "valid", "test")}
    with pytest.raises(UserlensError, match=r"task churn has 0 positive and 100 negative users in the train split"):
        check_counts(counts, settings.train, ["books", "pets"])
    counts["train"]["churn"] = 10
    check_counts(counts | {"test": {**counts["test"], "churn": 5}}, settings.train, ["books", "pets"])
    with pytest.raises(UserlensError, match=r"the valid split is empty"):
        check_counts({**counts, "valid": {"users": 0}}, settings.train, ["books"])


def test_incompatible_model_directory_is_refused(tmp_path):
    write_json(str(tmp_path / "model.json"), {"format_version": FORMAT_VERSION + 98})
    with pytest.raises(
        UserlensError,
        match=rf"model format version {FORMAT_VERSION + 98} is not supported; "
        rf"this userlens reads version {FORMAT_VERSION}",
    ):
        load_artifact(str(tmp_path))
    with pytest.raises(UserlensError, match="not a userlens model directory"):
        load_artifact(str(tmp_path / "nothing"))


def test_missing_opacus_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # what an environment without the extra looks like
    settings = make_settings(tmp_path, "train.dp.enabled=true")
    with pytest.raises(
        ConfigError, match=r"^train.dp.enabled: DP-SGD needs Opacus.*pip install 'userlens\[privacy\]'$"
    ):
        check_train_settings(settings)


def test_dp_with_the_recommendation_head_is_refused_before_spark(tmp_path):
    settings = make_settings(tmp_path, "train.dp.enabled=true")
    with pytest.raises(ConfigError, match=r"^train.recommend.enabled: .*cannot be trained with DP-SGD"):
        check_train_settings(settings)


def test_item_history_is_point_in_time(spark, warehouse):
    """History and earlier purchases come from events up to the cutoff only, positives after it only,
    and an item bought before the cutoff is never a positive."""
    settings = make_settings(warehouse)
    events = Tables(spark, settings.storage).read("events")
    cut = cutoff(AS_OF, 7)
    rows = {r["user_key"]: r for r in item_history(events, cut, AS_OF, 5).collect()}
    ev = events.where(F.col("item_id").isNotNull()).select("user_key", "item_id", "event_type", "event_date").collect()
    before = {}
    bought_before, bought_after = {}, {}
    for e in ev:
        if e["event_date"] <= cut:
            before.setdefault(e["user_key"], {})
            before[e["user_key"]][e["item_id"]] = max(
                before[e["user_key"]].get(e["item_id"], e["event_date"]), e["event_date"]
            )
            if e["event_type"] == "purchase":
                bought_before.setdefault(e["user_key"], set()).add(e["item_id"])
        elif e["event_date"] <= AS_OF and e["event_type"] == "purchase":
            bought_after.setdefault(e["user_key"], set()).add(e["item_id"])
    assert set(rows) == set(before) | set(bought_after)
    checked = 0
    for user, r in rows.items():
        items = before.get(user, {})
        assert len(r["hist_items"]) == min(5, len(items)) == len(r["hist_ages"])
        assert all(
            item in items and (cut - items[item]).days == age for item, age in zip(r["hist_items"], r["hist_ages"])
        )
        assert r["hist_ages"] == sorted(r["hist_ages"])  # newest first
        if len(items) > 5:  # the 5 kept are the newest
            assert max(r["hist_ages"]) <= sorted((cut - d).days for d in items.values())[4]
        assert set(r["bought"]) == bought_before.get(user, set())
        assert set(r["next_items"]) == bought_after.get(user, set()) - bought_before.get(user, set())
        checked += bool(r["next_items"])
    assert checked > 20


def test_numeric_features_are_finite_and_named(spark, warehouse):
    from userlens.features import feature_names

    settings = make_settings(warehouse)
    events = Tables(spark, settings.storage).read("events")
    users = labelled_users(events, cutoff(AS_OF, 7), AS_OF, settings.ingest.event_types, settings.train)
    x = np.array([r["features"] for r in users.select("features").collect()])
    assert x.shape[1] == len(feature_names(settings.ingest.event_types))
    assert np.isfinite(x).all() and (x >= 0).all()
    assert (x[:, 0] <= 14).all()  # recency never exceeds the days observed before the cutoff


def _shard(path: Path, rows: int, files: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir()
    out = []
    for f in range(files):
        ids = np.arange(f * rows, (f + 1) * rows)
        emb = np.repeat(ids[:, None], 4, axis=1).astype(np.float32)  # every input holds the row's id
        table = pa.table(
            {
                "embedding": pa.array(list(emb)),
                "features": pa.array([[0.0, 1.0]] * rows),
                "purchase": (ids % 2).astype(np.int32),
                "churn": np.zeros(rows, np.int32),
            }
        )
        pq.write_table(table, path / f"part-{f}.parquet")
        out.append(str(path / f"part-{f}.parquet"))
    return out


def test_a_shard_is_decoded_once_and_every_epoch_still_sees_each_row_once(tmp_path):
    from userlens.models.contracts import FeatureSpec
    from userlens.models.training import ShardReader

    files = _shard(tmp_path / "split=train", rows=300, files=3)
    spec = FeatureSpec(["a", "b"], [0.0, 0.0], [1.0, 1.0], 4, "test")
    cached = ShardReader(files, spec, ["purchase", "churn"])
    rng = np.random.default_rng(0)
    epochs = [[b["x"][:, 0].astype(int) for b in cached.batches(128, rng)] for _ in range(2)]
    assert cached._cache is not None and len(cached._cache["x"]) == 900  # kept after the first epoch
    for batches in epochs:
        assert [len(b) for b in batches] == [128] * 7 + [4]
        assert sorted(np.concatenate(batches)) == list(range(900))  # each row once per epoch
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))  # shuffled anew
    assert not np.array_equal(np.concatenate(epochs[0]), np.arange(900))
    labels = next(cached.batches(900, None))
    assert np.array_equal(labels["purchase"], np.arange(900) % 2)  # labels stay with their rows

    # a shard over the cache budget streams from Parquet every epoch, with the same rows
    streamed = ShardReader(files, spec, ["purchase", "churn"], cache_bytes=1000)
    rows = np.concatenate([b["x"][:, 0].astype(int) for b in streamed.batches(128, np.random.default_rng(0))])
    assert streamed._cache is None and sorted(rows) == list(range(900))


def _snapshot(root: Path, rows_per_file: int, next_category: list[int]) -> None:
    """split=train with one file per value of ``next_category`` (every row of file f has label
    next_category[f], -1 = no label), split=valid and split=test with one labelled file each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    files = {"train": next_category, "valid": [0], "test": [1]}
    for split, labels in files.items():
        (root / f"split={split}").mkdir(parents=True)
        for f, label in enumerate(labels):
            emb = rng.normal(size=(rows_per_file, 8)).astype(np.float32)
            purchase = (emb[:, 0] > 0).astype(np.int32)
            pq.write_table(
                pa.table(
                    {
                        "embedding": pa.array(list(emb)),
                        "features": pa.array(list(rng.random((rows_per_file, 2)))),
                        "purchase": purchase,
                        "churn": 1 - purchase,
                        "next_category": np.full(rows_per_file, label, np.int32),
                    }
                ),
                root / f"split={split}" / f"part-{f}.parquet",
            )


def test_ddp_survives_a_rank_whose_batches_have_no_next_category_label(spark, tmp_path):
    """Regression: a rank whose batch had no next_category label left that head without a gradient, so
    its DDP all-reduce never started there; gloo paired the other rank's gradients with the validation
    all-reduce and aborted the run. Here rank 1's shard has no such label at all. It also checks that
    every rank returns rank 0's summary."""

    from pyspark.ml.torch.distributor import TorchDistributor

    from userlens.models.contracts import FeatureSpec, ModelConfig, TrainingData, TrainJob

    _snapshot(tmp_path / "snapshot", rows_per_file=64, next_category=[1, -1])
    config = ModelConfig(
        tasks=["purchase", "churn", "next_category"],
        classes=["a", "b"],
        hidden=[16],
        dropout=0.0,
        input_dim=10,
        numeric_dim=2,
    )
    job = TrainJob(
        snapshot=str(tmp_path / "snapshot"),
        snapshot_id="synthetic",
        version="v",
        artifact=str(tmp_path / "model"),
        config=config,
        features=FeatureSpec(["a", "b"], [0.0, 0.0], [1.0, 1.0], 8, "test"),
        data=TrainingData("", "", 7, {}, "test"),
        batch_size=16,
        epochs=3,
        patience=3,
        learning_rate=1e-2,
        weight_decay=0.0,
        seed=1,
    )
    returned = tmp_path / "returned"
    returned.mkdir()

    def each_rank(job):  # train_main, keeping each rank's return value (a closure: pickled by value)
        import os
        import pickle

        from userlens.models.training import train_main

        summary = train_main(job)
        (returned / f"rank-{os.environ['RANK']}.pkl").write_bytes(pickle.dumps(summary))
        return summary

    summary = TorchDistributor(num_processes=2, local_mode=True, use_gpu=False).run(each_rank, job)
    assert summary.training.world_size == 2 and summary.training.epochs_run == 3
    # the local mode pickles every rank's return value to one file and the last one written wins: a rank
    # returning None instead of rank 0's summary failed CI once (distributed_fit: "returned no summary")
    ranks = sorted(returned.iterdir())
    assert [p.name for p in ranks] == ["rank-0.pkl", "rank-1.pkl"]
    assert [repr(pickle.loads(p.read_bytes())) for p in ranks] == [repr(summary)] * 2
    assert summary.training.samples == 3 * 2 * 64  # every step of every epoch on both ranks
    assert summary.training.baseline_fallback == {}  # a job without baseline heads (train.baseline_fallback=false)
    assert load_artifact(str(tmp_path / "model")).metrics["model"]["next_category"]["n"] == 64


def test_a_head_that_training_does_not_improve_ends_as_a_linear_candidate(spark, warehouse, tmp_path):
    """train.baseline_fallback: one epoch at a learning rate that wrecks the model validates worse than
    the Spark baseline's regression and the state probe on purchase and churn, so both heads end as the one
    of the two that validated better and give its test predictions; next_category keeps its trained head."""
    settings = settings_for(
        warehouse,
        tmp_path,
        *SMALL,
        "train.epochs=1",
        "train.learning_rate=3.0",
        "train.recommend.enabled=false",
        "train.state_probe=true",
        "train.linear_reg_params=[0.1, 1.0]",
        *STATE_ON,
    )
    result, run = train(spark, settings)
    metrics = load_artifact(result.path).metrics
    heads = metrics["training"]["baseline_fallback"]
    assert set(heads) == {"purchase", "churn"} and set(heads.values()) <= {"baseline", "state probe"}
    for task in ("purchase", "churn"):  # the probe: its regParam chosen on valid, its own test metrics
        probe = metrics["baseline"][f"{task} (state probe)"]
        assert probe["reg_param"] in (0.1, 1.0) and 0.0 <= probe["auc"] <= 1.0 and probe["n"] == result.users["test"]
    assert result.heads == result.run_record().details["baseline_fallback"] == heads
    model = np.load(Path(result.path, "test_predictions.npz"))
    baseline = np.load(Path(result.path, "baseline_predictions.npz"))
    for task in ("purchase", "churn"):
        # the candidate's own test AUC, as Spark scored it (the probe's: baseline["<task> (state probe)"])
        candidate = task if heads[task] == "baseline" else f"{task} (state probe)"
        assert metrics["model"][task]["auc"] == pytest.approx(metrics["baseline"][candidate]["auc"], abs=1e-6)
        if heads[task] == "baseline":
            # the same probabilities (row order differs: the snapshot's files vs Spark's collect)
            np.testing.assert_allclose(np.sort(model[f"{task}.p"]), np.sort(baseline[f"{task}.p"]), atol=1e-5)
    # the regression's heads do not read the trunk; next_category's trained head does
    artifact = load_artifact(result.path)
    for task in ("purchase", "churn", "next_category"):
        head = artifact.model.heads[task]
        on_trunk = head.weight[:, : head.in_features - artifact.config.numeric_dim]
        assert bool((on_trunk == 0).all()) == (task != "next_category"), task
