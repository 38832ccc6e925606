"""Train stage: DDP scaling through TorchDistributor, the stage's overhead, and the DP-SGD epsilon sweep.

    .venv/bin/python bench/train.py [--rows 40000] [--epochs 3] [--users 1000] [--dp-sweep]
                                    [--scaling-only] [--batch-size 256]
    .venv/bin/python bench/train.py --splits 5 [--users 1000] [--views "history, state" --views history ...]

(1) Scaling: a synthetic snapshot of --rows users (384-d embeddings, the real
    feature count, labels from a noisy linear rule) is written with pyarrow;
    TorchDistributor(local_mode=True) trains it for --epochs with 1 process
    and with 2 processes (the same batch, --batch-size 256, per step per process).
    samples/s is counted inside the training loop of every rank (process start
    and data loading of the first step excluded); goal (issue 23 (c), at
    --batch-size >= 512 and --rows >= 10,000): 2 processes / 1 >= 0.8 x the
    machine's ceiling below.
    A third run, 1 process held to one torch thread (``torch_threads``), is the
    per-process reference: on a machine with as many cores as processes, a
    single process otherwise uses every core through torch's intra-op threads.
    Last, the machine's own ceiling: the bare training step (the same model,
    random in-memory batches, no data loading, no all-reduce) in two
    independent one-thread processes at once ÷ in one; DDP's per-process
    scaling is printed as a share of it.
(2) Overhead: sample logs of --users users -> ingest -> `run_train` (not
    timed before train); wall time of the stage / time of the
    TorchDistributor call, and / the time inside the training loop.
(3) --dp-sweep: the model of (2) trained again on the same snapshot with
    DP-SGD at epsilon 1, 3, 8 and without DP (1 process each); test metrics.
(4) --splits N (alone): one --users sample, the train stage run on N different
    train/valid/test splits (``train.split.salt``), recommendation head off;
    test AUC of the model, the RFM-only baseline and the bag-of-words baseline
    per split, and the mean differences with their standard errors. With
    --views (repeated), once per set of ``train.views``: the ablation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from userlens.config import load_settings  # noqa: E402
from userlens.features import feature_names  # noqa: E402
from userlens.models.contracts import DPJob, FeatureSpec, ModelConfig, ModelMetrics, TrainingData, TrainJob  # noqa: E402
from userlens.privacy import load_key  # noqa: E402
from userlens.runs import StageRun  # noqa: E402
from userlens.sample import SampleSpec, generate_sample  # noqa: E402
from userlens.spark import get_spark  # noqa: E402
from userlens.stages.ingest import run_ingest  # noqa: E402
from userlens.stages.train import distributed_fit, run_train  # noqa: E402

DIM = 384


def synthetic_snapshot(root: Path, rows: int, n_features: int, files: int, seed: int = 0) -> None:
    """split=train|valid|test folders of Parquet files with learnable labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    w = rng.normal(size=DIM + n_features)
    for split, n in (("train", rows), ("valid", rows // 10), ("test", rows // 10)):
        out = root / f"split={split}"
        out.mkdir(parents=True)
        for part in range(files):
            m = n // files
            emb = rng.normal(size=(m, DIM)).astype(np.float32)
            feats = rng.gamma(1.0, 3.0, size=(m, n_features))
            score = np.concatenate([emb, np.log1p(feats)], axis=1) @ w / np.sqrt(DIM) + rng.normal(size=m)
            table = pa.table(
                {
                    "user_key": [f"u{part}-{i}" for i in range(m)],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), DIM).cast(
                        pa.list_(pa.float32())
                    ),
                    "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), n_features).cast(
                        pa.list_(pa.float64())
                    ),
                    "purchase": (score > 0).astype(np.int32),
                    "churn": (score < -1).astype(np.int32),
                    "next_category": (np.abs(score * 3).astype(np.int32) % 8),
                }
            )
            pq.write_table(table, out / f"part-{part:05d}.parquet")


def synthetic_config(settings) -> ModelConfig:
    """The model of the scaling runs: the configured trunk over 384-d embeddings and the real features."""
    names = feature_names(settings.ingest.event_types)
    return ModelConfig(
        tasks=["purchase", "churn", "next_category"],
        classes=[f"c{i}" for i in range(8)],
        hidden=list(settings.train.hidden),
        dropout=settings.train.dropout,
        input_dim=DIM + len(names),
        numeric_dim=len(names),
    )


def scaling(settings, rows: int, epochs: int, batch_size: int = 256) -> dict[str, dict]:
    names = feature_names(settings.ingest.event_types)
    work = Path(tempfile.mkdtemp(prefix="userlens-bench-train-"))
    try:
        synthetic_snapshot(work / "snapshot", rows, len(names), files=4)
        config = synthetic_config(settings)
        features = FeatureSpec(names, [1.0] * len(names), [1.0] * len(names), DIM, "synthetic")
        results = {}
        runs = [("1", 1, None), ("2", 2, None), ("1x1", 1, 1)] * 2  # interleaved: the noise hits all
        for label, processes, threads in runs:
            job = TrainJob(
                snapshot=str(work / "snapshot"),
                snapshot_id="synthetic",
                version="bench",
                artifact=str(work / f"model-{processes}"),
                config=config,
                features=features,
                data=TrainingData("", "", 0, {}, "synthetic"),
                batch_size=batch_size,
                epochs=epochs,
                patience=epochs,
                learning_rate=1e-3,
                weight_decay=1e-3,
                seed=1,
                torch_threads=threads,
            )
            train = settings.train.model_copy(update={"num_processes": processes, "local_mode": True})
            start = time.perf_counter()
            summary = distributed_fit(job, train)
            wall = time.perf_counter() - start
            best = results.get(label)
            info = summary.training
            if best is None or info.samples_per_second > best["samples_per_second"]:
                results[label] = {
                    "samples_per_second": info.samples_per_second,
                    "wall": wall,
                    "fit_seconds": info.fit_seconds,
                    "samples": info.samples,
                }
            what = f"{processes} process(es)" + (f", {threads} torch thread each" if threads else "")
            print(
                f"  {what}: {info.samples_per_second:,.0f} samples/s in the loop, "
                f"{wall:.1f} s for the whole TorchDistributor call",
                flush=True,
            )
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bare_steps(config: dict, batch_size: int, seconds: float, queue) -> None:
    """One process, one torch thread: forward, backward and AdamW steps of the model on random batches for
    ``seconds``; puts samples/s. No data loading, no communication."""
    import torch

    from userlens.models.predictor import BehaviourModel, task_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(**config)
    model = BehaviourModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, cfg.input_dim)
    y = {
        "purchase": torch.randint(0, 2, (batch_size,)),
        "churn": torch.randint(0, 2, (batch_size,)),
        "next_category": torch.randint(0, len(cfg.classes), (batch_size,)),
    }

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        task_loss(model(x), y).backward()
        optimizer.step()

    for _ in range(20):
        step()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += batch_size
    queue.put(n / (time.perf_counter() - start))


def hardware_ceiling(config: dict, batch_size: int, seconds: float = 6.0) -> float:
    """Samples/s of two independent one-thread processes running the bare training step at once ÷ one
    such process alone (interleaved twice, best of each): what two processes can gain on this machine
    before any data loading or all-reduce. 2.0 on two free cores; less where they share a physical core,
    memory bandwidth or a busy host."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    best = {1: 0.0, 2: 0.0}
    for procs in (1, 2, 1, 2):
        queue = ctx.Queue()
        workers = [ctx.Process(target=_bare_steps, args=(config, batch_size, seconds, queue)) for _ in range(procs)]
        for w in workers:
            w.start()
        total = sum(queue.get() for _ in workers)
        for w in workers:
            w.join()
        best[procs] = max(best[procs], total)
    return best[2] / best[1]


def stage_run(spark, settings, label: str):
    run = StageRun("train", run_id=f"bench-{label}-{os.urandom(3).hex()}")
    start = time.perf_counter()
    result = run_train(spark, settings, run)
    return time.perf_counter() - start, result


def _job_of(artifact: str, settings) -> TrainJob:
    """The training job of a finished stage run, rebuilt from its artifact (same snapshot, same features)."""
    from userlens.models.storage import read_json

    metrics = ModelMetrics.from_json(read_json(f"{artifact}/metrics.json"))
    t = settings.train
    return TrainJob(
        snapshot=f"{Path(artifact).parent}/snapshots/{metrics.snapshot_id}",
        snapshot_id=metrics.snapshot_id,
        artifact=artifact,
        version=metrics.version,
        config=ModelConfig(**read_json(f"{artifact}/model.json")),
        features=FeatureSpec(**read_json(f"{artifact}/feature_spec.json")),
        data=metrics.data,
        batch_size=t.batch_size,
        epochs=t.epochs,
        patience=t.patience,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        seed=t.seed,
        baseline=metrics.baseline,
    )


def _mean_se(d: list[float]) -> str:
    mean = float(np.mean(d))
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    above = sum(x > 0 for x in d)
    return f"{mean:+.3f} ± {se:.3f} (mean ± standard error over {len(d)} splits; {above} of {len(d)} above)"


def oracle_aucs(spark, settings, spec: SampleSpec, result, cut: dt.date, tasks) -> dict[str, float]:
    """Test AUC of the baseline's regression (log1p counts, regParam 1e-3) with oracle features from the
    generator's hidden state as of the cutoff added (``generate_user_truth``): the intents stated in the 8
    days before it, the days since the newest one, the complaints of the 10 days before it, and the share
    of activity left in the label window by a fade after a complaint. What a model could reach if it read
    the texts perfectly."""
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    from userlens.models import metrics as M
    from userlens.models.storage import read_json
    from userlens.sample import build_catalog, generate_user_truth
    from userlens.stages.forget import user_key_of

    key = load_key(settings.privacy)
    catalog = build_catalog(spec)
    c = (cut - spec.start_date).days
    horizon = settings.train.horizon_days
    rows = []
    for i in range(spec.users):
        truth = generate_user_truth(spec, i, catalog)
        said = [d for d, _ in truth["intents"] if d <= c]
        fade = truth["fade"]
        left = 1.0
        if fade is not None and fade[0] <= c:
            left = float(np.mean([math.exp(-(t - fade[0]) / fade[1]) for t in range(c + 1, c + 1 + horizon)]))
        recent = float(sum(1 for d in said if d > c - 8))
        complained = float(sum(1 for d in truth["complaints"] if c - 10 < d <= c))
        since = float(min((c - d for d in said), default=30))
        rows.append((user_key_of(f"u{i:07d}", key), [recent, since, left, complained]))
    oracle = spark.createDataFrame(rows, "user_key string, oracle array<double>")
    snapshot = f"{Path(result.path).parent}/snapshots/{read_json(f'{result.path}/metrics.json')['snapshot_id']}"
    counts = F.transform("features", lambda v: F.log1p(F.greatest(v, F.lit(0.0))))
    data = (
        spark.read.parquet(snapshot)
        .join(oracle, "user_key")
        .select("split", array_to_vector(F.concat(counts, "oracle")).alias("x"), *tasks)
    )
    out = {}
    for task in tasks:
        train_rows = data.where(F.col("split") == "train").withColumn(task, F.col(task).cast("double"))
        model = LogisticRegression(featuresCol="x", labelCol=task, maxIter=50, regParam=1e-3).fit(train_rows)
        got = (
            model.transform(data.where(F.col("split") == "test"))
            .select(task, vector_to_array("probability")[1].alias("p"))
            .collect()
        )
        out[task] = M.roc_auc(np.array([r[0] for r in got]), np.array([r[1] for r in got]))
    return out


def sentence_probe(spark, settings, result, cut: dt.date, tasks, searches: int = 3) -> dict[str, float]:
    """Test AUC of a probe that reads the newest free texts one sentence at a time: the encoder's vector of
    the user's newest review text and the mean of those of the ``searches`` newest search queries as of the
    cutoff (zeros where there is none), beside the standardized log1p counts (scaled by 10, so the L2 penalty
    falls on the text vectors), a scikit-learn logistic regression whose C is chosen on the valid split's AUC.
    The state text's embedding encodes the same texts inside one composed paragraph; this asks whether
    encoding them alone keeps what mean pooling over the paragraph loses (docs/benchmarks.md)."""
    import pandas as pd
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from sklearn.linear_model import LogisticRegression

    from userlens.models import metrics as M
    from userlens.models.encoder import load_encoder
    from userlens.models.storage import read_json
    from userlens.tables import Tables

    events = Tables(spark, settings.storage).read("events").where(F.col("event_date") <= F.lit(cut))
    newest = Window.partitionBy("user_key", "event_type").orderBy(F.col("event_time").desc(), F.col("event_id"))
    kept = F.when(F.col("event_type") == "review", 1).otherwise(searches)
    said = (
        events.where(F.col("event_type").isin("review", "search"))
        .select(
            "user_key", "event_type", F.coalesce("query", "text").alias("t"), F.row_number().over(newest).alias("n")
        )
        .where(F.col("t").isNotNull() & (F.col("n") <= kept))
        .toPandas()
    )
    encoder = load_encoder(settings.embed.model, device="cpu")
    distinct = sorted(set(said.t))
    vectors = dict(zip(distinct, encoder.encode(distinct))) if distinct else {}
    dim = encoder.dimension
    by_user: dict[str, dict[str, list[np.ndarray]]] = {}
    for user, kind, text in zip(said.user_key, said.event_type, said.t):
        by_user.setdefault(user, {}).setdefault(kind, []).append(vectors[text])

    def text_block(users: pd.Series) -> np.ndarray:
        zero = np.zeros(dim)
        rows = []
        for user in users:
            mine = by_user.get(user, {})
            rows.append(np.concatenate([np.mean(mine.get(kind, [zero]), axis=0) for kind in ("review", "search")]))
        return np.array(rows)

    snapshot = f"{Path(result.path).parent}/snapshots/{read_json(f'{result.path}/metrics.json')['snapshot_id']}"
    frame = spark.read.parquet(snapshot).select("user_key", "split", "features", *tasks).toPandas()
    counts = np.log1p(np.maximum(np.stack(frame.features.to_numpy()), 0.0))
    train = (frame.split == "train").to_numpy()
    mean, std = counts[train].mean(axis=0), counts[train].std(axis=0) + 1e-9
    x = np.hstack([(counts - mean) / std * 10.0, text_block(frame.user_key) * 10.0])
    out = {}
    for task in tasks:
        y = frame[task].to_numpy()
        best = None
        for c in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
            model = LogisticRegression(C=c, max_iter=3000).fit(x[train], y[train])
            valid = (frame.split == "valid").to_numpy()
            auc = M.roc_auc(y[valid], model.predict_proba(x[valid])[:, 1])
            if best is None or auc > best[0]:
                best = (auc, model)
        assert best is not None
        test = (frame.split == "test").to_numpy()
        out[task] = M.roc_auc(y[test], best[1].predict_proba(x[test])[:, 1])
    return out


def split_comparison(spark, work: Path, base: list[str], users: int, splits: int, views: list[str]) -> None:
    """(4) The model against the RFM-only logistic baseline and the bag-of-words baseline on ``splits``
    different train/valid/test splits (``train.split.salt``) of the same sample, once per set of ``views``
    (``train.views``: the ablation): test AUC per split, and the mean differences with their standard errors.
    One split's ~150 test users give an AUC a standard error of about 0.03. The texts as of the cutoff are
    embedded once, before the splits (textualize and embed at the cutoff date), so every run reuses them."""
    from userlens.stages.embed import run_embed
    from userlens.stages.textualize import run_textualize

    settings = load_settings(None, [*base, f"storage.models={work / 'models'}"])
    spec = SampleSpec(users=users, days=30)
    generate_sample(spark, str(work / "raw"), spec)
    ingest = run_ingest(spark, settings, load_key(settings.privacy), StageRun("ingest", "bench-ingest"), None, True)
    cut = ingest.as_of_date - dt.timedelta(days=settings.train.horizon_days)
    run_textualize(spark, settings, StageRun("textualize", "bench-textualize"), cut)
    run_embed(spark, settings, StageRun("embed", "bench-embed"), cut)
    tasks = ("purchase", "churn")
    diffs: dict[tuple[str, str, str], list[float]] = {}
    for i in range(splits):
        line = []
        for j, view in enumerate(views):
            split = load_settings(
                None,
                [
                    *base,
                    f"storage.models={work / 'models' / f'split{i}-{j}'}",
                    f"train.split.salt=bench-split-{i}",
                    "train.recommend.enabled=false",
                    f"train.views=[{view}]",
                    f"train.text_baseline={'true' if j == 0 else 'false'}",  # the same for every view
                ],
            )
            _, result = stage_run(spark, split, f"split{i}-{j}")
            if j == 0:
                first = result
                words = {t: result.baseline[f"{t} (bag of words)"]["auc"] for t in tasks}
                oracle = oracle_aucs(spark, settings, spec, result, cut, tasks)
                sentences = sentence_probe(spark, settings, result, cut, tasks)
                for task in tasks:
                    diffs.setdefault(("oracle", task, "baseline"), []).append(
                        oracle[task] - result.baseline[task]["auc"]
                    )
                    for other, theirs in (("baseline", result.baseline[task]["auc"]), ("bag-of-words", words[task])):
                        diffs.setdefault(("sentence probe", task, other), []).append(sentences[task] - theirs)
            for task in tasks:
                model, baseline = result.model[task]["auc"], result.baseline[task]["auc"]
                diffs.setdefault((view, task, "baseline"), []).append(model - baseline)
                diffs.setdefault((view, task, "bag-of-words"), []).append(model - words[task])
                line.append(f"{task} [{view}] {model:.3f}")
            if "next_category" in result.model:  # accuracy and top-3 against both baselines
                got = result.model["next_category"]
                others = {"baseline": first.baseline["next_category"]}
                if (bow := first.baseline.get("next_category (bag of words)")) and "accuracy" in bow:
                    others["bag-of-words"] = bow
                for metric in ("accuracy", "top3_accuracy"):
                    for other, theirs in others.items():
                        diffs.setdefault((view, f"next_category {metric}", other), []).append(
                            got[metric] - theirs[metric]
                        )
                line.append(f"next_category [{view}] {got['accuracy']:.3f} / {got['top3_accuracy']:.3f}")
        line += [  # (the probe and the head chosen: of the first views' run)
            f"{t} baseline {first.baseline[t]['auc']:.3f}, bag-of-words {words[t]:.3f}, oracle {oracle[t]:.3f}, "
            f"sentence probe {sentences[t]:.3f}"
            + (f", state probe {probe['auc']:.3f}" if (probe := first.baseline.get(f"{t} (state probe)")) else "")
            + f", head [{views[0]}] {first.heads.get(t, 'trained')}"
            for t in tasks
        ]
        if "next_category" in first.baseline:
            nc = first.baseline["next_category"]
            bow = first.baseline.get("next_category (bag of words)", {})
            line.append(
                f"next_category baseline {nc['accuracy']:.3f} / {nc['top3_accuracy']:.3f}"
                + (f", bag-of-words {bow['accuracy']:.3f} / {bow['top3_accuracy']:.3f}" if "accuracy" in bow else "")
            )
        print(f"    split {i}: " + "; ".join(line), flush=True)
    print("  oracle (the counts and the generator's hidden state, the same regression):", flush=True)
    for task in tasks:
        print(f"    {task}: oracle - baseline AUC = {_mean_se(diffs[('oracle', task, 'baseline')])}", flush=True)
    print("  sentence probe (the counts and the newest review's and searches' vectors, one sentence each):", flush=True)
    for task in tasks:
        for other in ("baseline", "bag-of-words"):
            print(
                f"    {task}: sentence probe - {other} AUC = {_mean_se(diffs[('sentence probe', task, other)])}",
                flush=True,
            )
    for view in views:
        print(f"  views [{view}]:", flush=True)
        for task in tasks:
            for other in ("baseline", "bag-of-words"):
                print(f"    {task}: model - {other} AUC = {_mean_se(diffs[(view, task, other)])}", flush=True)
        for metric in ("accuracy", "top3_accuracy"):
            for other in ("baseline", "bag-of-words"):
                if (found := diffs.get((view, f"next_category {metric}", other))) is not None:
                    print(f"    next_category: model - {other} {metric} = {_mean_se(found)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000, help="synthetic training users for the scaling run")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--users", type=int, default=1000, help="sample users for the overhead run")
    parser.add_argument("--dp-sweep", action="store_true", help="also train with DP-SGD at epsilon 1, 3, 8")
    parser.add_argument("--scaling-only", action="store_true", help="only (1), the DDP scaling runs")
    parser.add_argument("--batch-size", type=int, default=256, help="per-process batch of the scaling runs")
    parser.add_argument(
        "--splits",
        type=int,
        default=0,
        help="only (4): the model against the baseline on this many train/valid/test splits of one --users sample",
    )
    parser.add_argument(
        "--views",
        action="append",
        default=[],
        help='with --splits: a train.views set to compare (repeat it: --views "history, state" --views history); '
        'default "history, state"',
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra settings for every run (e.g. train.dropout=0.5)",
    )
    args = parser.parse_args()

    os.environ.setdefault("USERLENS_HMAC_KEY", "bench-hmac-key-0123456789abcdef")
    work = Path(tempfile.mkdtemp(prefix="userlens-bench-train-wh-"))
    base = [
        "spark.ui=false",
        "spark.log_level=ERROR",
        "spark.conf.spark.ui.showConsoleProgress=false",
        f"storage.warehouse={work / 'warehouse'}",
        f"source.path={work / 'raw'}",
        *args.overrides,
    ]
    settings = load_settings(None, [*base, f"storage.models={work / 'models'}"])
    spark = get_spark(settings)
    try:
        if args.splits:
            print(f"(4) model vs baseline: {args.users} sample users, {args.splits} splits", flush=True)
            split_comparison(spark, work, base, args.users, args.splits, args.views or ["history, state"])
            return
        print(
            f"(1) DDP scaling: {args.rows:,} synthetic users, {args.epochs} epochs, "
            f"batch {args.batch_size} per process, {os.cpu_count()} cores",
            flush=True,
        )
        res = scaling(settings, args.rows, args.epochs, args.batch_size)
        ratio = res["2"]["samples_per_second"] / res["1"]["samples_per_second"]
        per_process = res["2"]["samples_per_second"] / res["1x1"]["samples_per_second"]
        ceiling = hardware_ceiling(asdict(synthetic_config(settings)), args.batch_size)
        print(f"    samples/s 2 processes / 1 process = {ratio:.2f}", flush=True)
        print(
            f"    samples/s 2 processes / 1 process on one thread = {per_process:.2f}  (per-process scaling)",
            flush=True,
        )
        print(
            f"    the machine's ceiling: 2 bare one-thread training processes / 1 = {ceiling:.2f}; "
            f"DDP reaches {ratio / ceiling:.0%} of it ({per_process / ceiling:.0%} per process)",
            flush=True,
        )
        verdict = "met" if ratio >= 0.8 * ceiling else "not met"
        print(
            f"    goal (issue 23 (c), batch >= 512 per rank, >= 10,000 users): 2 / 1 = {ratio:.2f} >= "
            f"0.8 x ceiling = {0.8 * ceiling:.2f}: {verdict}\n",
            flush=True,
        )
        if args.scaling_only:
            return

        print(f"(2) stage overhead: {args.users} sample users", flush=True)
        generate_sample(spark, str(work / "raw"), SampleSpec(users=args.users, days=30))
        run_ingest(spark, settings, load_key(settings.privacy), StageRun("ingest", "bench-ingest"), None, True)
        wall, result = stage_run(spark, settings, "full")
        t = result.seconds
        print(
            f"    userlens train wall {wall:.1f} s; TorchDistributor call {t['distributor_seconds']:.1f} s; "
            f"training loop {t['fit_seconds']:.1f} s; snapshot {t['snapshot_seconds']:.1f} s; "
            f"baseline {t['baseline_seconds']:.1f} s",
            flush=True,
        )
        print(
            f"    wall / TorchDistributor call = {wall / t['distributor_seconds']:.2f}; "
            f"wall / training loop = {wall / t['fit_seconds']:.1f}",
            flush=True,
        )
        print(
            "    test AUC  model vs RFM logistic baseline: "
            + "; ".join(
                f"{task} {result.model[task]['auc']:.3f} vs {result.baseline[task]['auc']:.3f}"
                for task in ("purchase", "churn")
            )
            + f"; next_category accuracy {result.model['next_category']['accuracy']:.3f} vs "
            f"{result.baseline['next_category']['accuracy']:.3f}\n",
            flush=True,
        )

        if args.dp_sweep:
            print("(3) DP-SGD sweep on the same snapshot (1 process each)", flush=True)
            job = _job_of(result.path, settings)
            n_train = result.users["train"]
            delta = 10.0 ** -math.ceil(math.log10(n_train))
            rows = []
            for eps in (1.0, 3.0, 8.0, None):
                run_job = replace(
                    job,
                    artifact=str(work / f"models-dp-{eps}"),
                    version=f"dp-{eps}",
                    dp=None if eps is None else DPJob(eps, delta, 1.0),
                )
                summary = distributed_fit(run_job, settings.train.model_copy(update={"num_processes": 1}))
                rows.append((eps, summary))
            print(
                f"    {n_train} training users, δ = {delta:g}, {settings.train.epochs} epochs planned, "
                f"batch {settings.train.batch_size}, clipping norm 1.0"
            )
            print("| target ε | achieved ε | purchase AUC | churn AUC | next_category acc |")
            print("|---|---|---|---|---|")
            for eps, r in rows:
                achieved = f"{r.training.dp['epsilon']:.2f}" if eps is not None and r.training.dp else "∞ (no DP)"
                print(
                    f"| {eps if eps is not None else '∞'} | {achieved} | {r.test['purchase']['auc']:.3f} "
                    f"| {r.test['churn']['auc']:.3f} | {r.test['next_category']['accuracy']:.3f} |"
                )
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
