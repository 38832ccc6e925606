"""The training function that ``TorchDistributor`` runs in every process (torch + pyarrow, no Spark).

``train_main(job)`` is pickled by the distributor and called once per rank
with the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...).
``job`` is a :class:`~userlens.models.contracts.TrainJob` of paths and settings:
the data never passes through the driver or the arguments. ``train_main`` is a
short driver over steps that each run in-process too (tests call them on CPU
without TorchDistributor): :func:`init_process`, :func:`build`,
:func:`fit_epochs` (:func:`train_epoch` per epoch), :func:`reduce_totals`,
:func:`choose_heads`, :func:`finalize` (rank 0) and :func:`hand_over`. Each rank

* reads only its own files of the snapshot's ``split=train`` and ``split=valid`` folders
  (``files[rank::world]``), streaming record batches with pyarrow through a
  shuffle buffer; all ranks run the same number of steps per epoch (the
  minimum over ranks, from Parquet metadata), so DDP never waits on a rank
  that ran out of data;
* trains the model under DDP (gloo on CPU, nccl on GPU);
* computes the validation loss of its shard; the sums are all-reduced, so
  every rank takes the same early-stopping decision.

Rank 0 writes a checkpoint every epoch, then the artifact directory with the
best epoch's weights and the test metrics, and hands a small summary to every
rank, which all return it (TorchDistributor's local mode keeps whichever
rank's return value is pickled last).

DP-SGD (Opacus) samples users with Poisson sampling over the whole training
set, as its accountant assumes: in that mode each rank loads the full train
split in memory and Opacus' distributed sampler picks each rank's part.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import math
import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from userlens.models.contracts import ModelMetrics, TrainingInfo, TrainJob, TrainSummary, vectors_of
from userlens.models.quality import ACTIVITY_FEATURE
from userlens.models.storage import list_files, read_catalogue

log = logging.getLogger("userlens.train")

SHUFFLE_BUFFER_ROWS = 65_536
READ_BATCH_ROWS = 8_192
# a rank keeps its decoded shard (model inputs, labels, history arrays) in memory between epochs up to this
# many bytes; a larger shard is read from Parquet again every epoch, through the shuffle buffer
CACHE_BYTES = 1 << 30
# how long the other ranks wait for rank 0 to evaluate the test split and write the artifact
HANDOFF_TIMEOUT_HOURS = 4
LABELS = ("purchase", "churn", "next_category")
VALID_BATCH_ROWS = 4096


NEXT_ITEMS = 20  # next purchases kept per user (positives, and the relevant set of the evaluation)
BOUGHT_ITEMS = 200  # earlier purchases kept per user (excluded from recommendations)
REC_COLUMNS = ("hist_items", "hist_ages", "next_items", "bought", "rec_eval")


class Catalogue:
    """The recommendation head's item index (item id -> row of the catalogue, ``pad`` = unknown)."""

    def __init__(self, item_ids: list[str], embeddings: np.ndarray, log_q: np.ndarray, history: int) -> None:
        import pandas as pd

        self.item_ids, self.embeddings, self.log_q = item_ids, embeddings, log_q
        self.lookup = pd.Index(item_ids)
        self.pad = len(item_ids)
        self.history = history

    def arrays(self, batch: Any) -> dict[str, np.ndarray]:
        """hist_idx (n, history, newest first), bought (n, BOUGHT_ITEMS), and where the batch has them
        next (n, NEXT_ITEMS) and rec_eval (n,)."""
        from userlens.models.recommend import list_column, padded_indices

        out = {
            "hist_idx": padded_indices(*list_column(batch.column("hist_items")), self.lookup, self.history, self.pad),
            "bought": padded_indices(*list_column(batch.column("bought")), self.lookup, BOUGHT_ITEMS, self.pad),
        }
        if "next_items" in batch.schema.names:
            out["next"] = padded_indices(*list_column(batch.column("next_items")), self.lookup, NEXT_ITEMS, self.pad)
        if "rec_eval" in batch.schema.names:
            out["rec_eval"] = batch.column("rec_eval").to_numpy(zero_copy_only=False).astype(bool)
        return out


class ShardReader:
    """Streams (x, labels) mini-batches from some Parquet files of a snapshot split."""

    def __init__(
        self,
        files: list[str],
        features: Any,
        tasks: list[str],
        catalogue: Catalogue | None = None,
        cache_bytes: int = CACHE_BYTES,
        keep_embedding: bool = False,
    ) -> None:
        self.files = files
        self.keep_embedding = keep_embedding
        self.features = features
        self.tasks = tasks
        self.catalogue = catalogue
        self.cache_bytes = cache_bytes
        self._cache: dict[str, np.ndarray] | None = None
        self._cacheable = cache_bytes > 0

    def rows(self) -> int:
        import pyarrow.parquet as pq

        from userlens.models.storage import _fs

        total = 0
        for uri in self.files:
            fs, path = _fs(uri)
            with fs.open_input_file(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def record_batches(self, order: list[str]) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow.parquet as pq

        from userlens.models.storage import _fs

        state = ["state_embedding"] if "state" in self.features.views else []
        columns = ["embedding", *state, "features", *self.tasks, *(REC_COLUMNS if self.catalogue else ())]
        for uri in order:
            fs, path = _fs(uri)
            with fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
                    yield self.to_numpy(batch)

    def to_numpy(self, batch: Any) -> dict[str, np.ndarray]:
        n = batch.num_rows
        emb = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
        raw = batch.column("features").flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
        state = None
        if "state" in self.features.views:
            state = vectors_of(batch.column("state_embedding"), n, self.features.state_dim)
        out = {"x": self.features.inputs(emb, state, raw)}
        if self.keep_embedding:  # the quality by segment reads the history embedding, whatever the views
            out["embedding"] = emb.astype(np.float32)
        if ACTIVITY_FEATURE in self.features.names:  # for the quality by activity decile (models.quality)
            out["activity"] = raw[:, self.features.names.index(ACTIVITY_FEATURE)].astype(np.float64)
        for task in self.tasks:
            out[task] = batch.column(task).to_numpy(zero_copy_only=False).astype(np.int64)
        if self.catalogue is not None:
            out.update(self.catalogue.arrays(batch))
        return out

    def _decode_all(self) -> dict[str, np.ndarray] | None:
        """The whole shard as one dict of arrays, or None (and no second try) when it exceeds ``cache_bytes``."""
        parts, size, decoded, rows = [], 0, 0, self.rows()
        for part in self.record_batches(list(self.files)):
            parts.append(part)
            size += sum(a.nbytes for a in part.values())
            decoded += len(part["x"])
            if size / decoded * rows > self.cache_bytes:  # the whole shard, at this many bytes per row
                self._cacheable = False
                return None
        if not parts:
            self._cacheable = False
            return None
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def batches(self, batch_size: int, rng: np.random.Generator | None) -> Iterator[dict[str, np.ndarray]]:
        """Mini-batches: shuffled when ``rng`` is given (the whole shard when it is cached, else through a
        buffer), in file order otherwise. The first call decodes the shard and keeps it when it fits
        ``cache_bytes``: decoding (Parquet, list columns, normalisation) then happens once, not every
        epoch; it cost about as much as the training step itself on CPU (docs/benchmarks.md)."""
        if self._cache is None and self._cacheable:
            self._cache = self._decode_all()
        if self._cache is not None:
            yield from _emit([self._cache], batch_size, rng, keep_remainder=False)
            return
        order = list(self.files)
        if rng is not None:
            rng.shuffle(order)
        buffer: list[dict[str, np.ndarray]] = []
        buffered = 0
        for part in self.record_batches(order):
            buffer.append(part)
            buffered += len(part["x"])
            if buffered >= SHUFFLE_BUFFER_ROWS:
                rest = yield from _emit(buffer, batch_size, rng, keep_remainder=True)
                buffer, buffered = ([rest], len(rest["x"])) if rest is not None else ([], 0)
        if buffer:
            yield from _emit(buffer, batch_size, rng, keep_remainder=False)


def _emit(
    buffer: list[dict[str, np.ndarray]], batch_size: int, rng: np.random.Generator | None, keep_remainder: bool
) -> Generator[dict[str, np.ndarray], None, dict[str, np.ndarray] | None]:
    merged = buffer[0] if len(buffer) == 1 else {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
    n = len(merged["x"])
    index = rng.permutation(n) if rng is not None else np.arange(n)
    full = (n // batch_size) * batch_size
    stop = full if keep_remainder else n
    for start in range(0, stop, batch_size):
        take = index[start : start + batch_size]
        yield {k: v[take] for k, v in merged.items()}
    if keep_remainder and full < n:
        take = index[full:]
        return {k: v[take] for k, v in merged.items()}
    return None


def _tensors(batch: dict[str, np.ndarray], tasks: list[str], device: Any) -> tuple[Any, dict[str, Any]]:
    import torch

    x = torch.from_numpy(batch["x"]).to(device, non_blocking=True)
    return x, {t: torch.from_numpy(batch[t]).to(device, non_blocking=True) for t in tasks}


def _rec_tensors(
    batch: dict[str, np.ndarray], catalogue: Catalogue | None, rng: np.random.Generator, device: Any
) -> Any:
    """The sequential head's input: each user's history in time order, one sampled next purchase
    appended as the newest item (right-padded tokens; every position's next item is a target)."""
    from userlens.models.recommend import sample_positive
    from userlens.models.sequential import chronological

    if catalogue is None:
        return None
    positive = sample_positive(batch["next"], catalogue.pad, rng)
    return chronological(batch["hist_idx"], catalogue.pad, positive).to(device)


@dataclass
class Process:
    """This rank's place in the run: its rank, the world, its device, and the groups it talks over."""

    rank: int
    world: int
    device: Any
    handoff: Any = None  # a gloo group for rank 0's summary (its own timeout), when distributed

    @property
    def distributed(self) -> bool:
        return self.world > 1


@dataclass
class Setup:
    """What a rank trains: the model, its optimizer, its data, and the baseline heads to beat."""

    model: Any
    optimizer: Any
    catalogue: Catalogue | None
    reader: ShardReader | None  # this rank's train shard (None under DP-SGD: ``loader``)
    loader: Any  # Opacus' Poisson-sampling loader under DP-SGD
    privacy_engine: Any
    valid: ShardReader
    steps: int  # training steps per epoch, the same on every rank
    fallback: dict[str, tuple[float, dict[str, Any], str]]

    @property
    def parts(self) -> tuple[str, ...]:
        return ("tasks", "recommend") if self.catalogue is not None else ("tasks",)


@dataclass
class Fit:
    """What the epochs left: per-epoch history, the best epoch of each part, samples and time."""

    history: list[dict[str, float]]
    best: dict[str, "_Best"]
    samples: int
    fit_seconds: float


def train_main(job: TrainJob) -> TrainSummary:
    """Entry point for ``TorchDistributor.run``: one rank's run; rank 0 writes the artifact, every rank
    returns rank 0's summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s userlens.train %(message)s", datefmt="%H:%M:%S")
    process = init_process(job)
    try:
        started = time.perf_counter()
        setup = build(job, process)
        fit = reduce_totals(process, fit_epochs(job, process, setup))
        state, heads = choose_heads(fit, setup.fallback)
        summary = finalize(job, process, setup, fit, state, heads, started) if process.rank == 0 else None
        return hand_over(process, summary)
    finally:
        if process.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def init_process(job: TrainJob, environ: dict[str, str] | None = None) -> Process:
    """Rank, world and device from torchrun's environment; the process group when there are several."""
    import torch
    import torch.distributed as dist

    env = os.environ if environ is None else environ
    rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if job.use_gpu:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        # the host's cores shared by its ranks, unless the job fixes it (bench/train.py's reference run)
        torch.set_num_threads(job.torch_threads or max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    process = Process(rank, world, device)
    if process.distributed:
        dist.init_process_group("nccl" if job.use_gpu else "gloo")
        # at the end rank 0 alone evaluates the test split and writes the artifact while the other ranks
        # wait to be handed its summary: that wait has its own CPU group, with a timeout sized for it
        # rather than the default group's (torch: 30 minutes on gloo, 10 on NCCL)
        process.handoff = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=HANDOFF_TIMEOUT_HOURS))
    return process


def build(job: TrainJob, process: Process) -> Setup:
    """The model (DDP or Opacus-wrapped), its optimizer, this rank's shards and the fallback heads."""
    import torch
    import torch.distributed as dist

    from userlens.models.predictor import BehaviourModel

    torch.manual_seed(job.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    config, features, tasks = job.config, job.features, list(job.config.tasks)
    catalogue = None
    if config.rec and job.recommend is not None:
        catalogue = Catalogue(*read_catalogue(f"{job.snapshot}/items"), job.recommend.history)
    model: Any = BehaviourModel(config, (catalogue.embeddings, catalogue.log_q) if catalogue else None)
    model = model.to(process.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.learning_rate, weight_decay=job.weight_decay)
    train_files = list_files(f"{job.snapshot}/split=train")
    valid = ShardReader(
        list_files(f"{job.snapshot}/split=valid")[process.rank :: process.world], features, tasks, catalogue
    )
    reader, loader, engine = None, None, None
    if job.dp is not None:
        model, optimizer, loader, engine = _make_private(
            model, optimizer, train_files, features, tasks, job, process.distributed
        )
        steps = len(loader)
    else:
        if process.distributed:
            # every parameter has a gradient at every step (a head without a label or a target in a batch still
            # gets a zero one: task_losses, sequence_loss), so DDP need not search for unused ones. Buffers
            # (the item catalogue's vectors) are read by every rank from the snapshot and never change:
            # broadcasting them from rank 0 before every forward (DDP's default) only moves bytes
            # (torch 2.15 renamed broadcast_buffers, which now warns, to forward_sync_buffers)
            ddp = torch.nn.parallel.DistributedDataParallel
            no_sync = (
                "forward_sync_buffers"
                if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else "broadcast_buffers"
            )
            sync_off: dict[str, Any] = {no_sync: False}  # Any: the keyword's name depends on the torch version
            model = ddp(model, find_unused_parameters=False, **sync_off)
        reader = ShardReader(train_files[process.rank :: process.world], features, tasks, catalogue)
        steps = math.ceil(reader.rows() / job.batch_size)
        if process.distributed:  # every rank runs the same number of steps
            t = torch.tensor([steps], device=process.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            steps = int(t.item())
    if steps < 1:
        raise ValueError(f"rank {process.rank} has no training rows in {job.snapshot}/split=train")
    # the baseline's regression as the other candidate of each of its tasks: a head ends as that
    # regression when no trained epoch gives its task a lower validation loss (its trunk weights are
    # zero, so the candidate needs no trunk of its own, and no recommendation head)
    fallback = _baseline_candidates(job, valid, tasks, process)
    return Setup(model, optimizer, catalogue, reader, loader, engine, valid, steps, fallback)


def fit_epochs(job: TrainJob, process: Process, setup: Setup) -> Fit:
    """Train until every part has gone ``job.patience`` epochs without a better validation loss (or
    ``job.epochs``); rank 0 checkpoints every epoch."""
    from userlens.models.predictor import save_state

    tasks = list(job.config.tasks)
    rng = np.random.default_rng([job.seed, process.rank])
    # the task heads and the recommendation head share no parameter (the head reads the input, not the
    # trunk), so each keeps the weights of its own best validation epoch and its own patience
    fit = Fit([], {part: _Best() for part in setup.parts}, 0, 0.0)
    for epoch in range(job.epochs):
        epoch_start = time.perf_counter()
        train_loss, n_steps, samples = train_epoch(job, process, setup, rng)
        fit.samples += samples
        fit.fit_seconds += time.perf_counter() - epoch_start
        losses = _validation_loss(
            setup.model, setup.valid, tasks, process.device, process.distributed, setup.catalogue, job.seed
        )
        fit.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": losses["tasks"],
                **({"valid_rec_loss": losses["recommend"]} if setup.catalogue is not None else {}),
                **{f"valid_loss_{task}": losses[f"task:{task}"] for task in tasks},
            }
        )
        state = _unwrap(setup.model).state_dict()
        for part in setup.parts:
            fit.best[part].update(
                epoch, losses[part], {k: v for k, v in state.items() if k.startswith("rec.") == (part == "recommend")}
            )
        stop = all(best.bad >= job.patience for best in fit.best.values())
        if process.rank == 0 and (epoch % job.log_every_epochs == 0 or stop or epoch == job.epochs - 1):
            log.info(
                "epoch %d: train loss %.4f, valid loss %.4f%s (%d steps/rank)%s",
                epoch,
                train_loss,
                losses["tasks"],
                f", recommendation {losses['recommend']:.4f}" if setup.catalogue is not None else "",
                n_steps,
                f"; stopped, best epoch {fit.best['tasks'].epoch}" if stop else "",
            )
        if process.rank == 0:
            save_state(
                f"{job.artifact}/checkpoints/last.pt",
                {
                    "epoch": epoch,
                    "model": state,
                    "optimizer": setup.optimizer.state_dict(),
                    "best_epoch": fit.best["tasks"].epoch,
                    "best_loss": fit.best["tasks"].loss,
                },
            )
        if stop:
            break
    return fit


def train_epoch(job: TrainJob, process: Process, setup: Setup, rng: np.random.Generator) -> tuple[float, int, int]:
    """One pass of ``setup.steps`` steps: (mean train loss, steps, samples)."""
    from userlens.models.predictor import task_loss

    tasks = list(job.config.tasks)
    rec_weight = job.recommend.weight if job.recommend is not None else 1.0
    setup.model.train()
    if setup.loader is not None:
        batches: Iterator[dict[str, np.ndarray]] = (_as_numpy_batch(b, tasks) for b in setup.loader)
    else:
        assert setup.reader is not None
        batches = setup.reader.batches(job.batch_size, rng)
    total, steps, samples = 0.0, 0, 0
    for batch in batches:
        if steps == setup.steps:
            break
        if len(batch["x"]) == 0:  # Poisson sampling can draw an empty batch
            continue
        x, y = _tensors(batch, tasks, process.device)
        setup.optimizer.zero_grad(set_to_none=True)
        loss = task_loss(setup.model(x, _rec_tensors(batch, setup.catalogue, rng, process.device)), y, rec_weight)
        loss.backward()
        setup.optimizer.step()
        total += float(loss.detach())
        samples += len(batch["x"])
        steps += 1
    close = getattr(batches, "close", None)
    if close is not None:
        # a rank stops after `steps` batches: finish the reader now (its open Parquet file and pyarrow's
        # read-ahead), not at interpreter exit, where a still-running native thread aborts the process
        # ("terminate called without an active exception") and torchrun's exit barrier then waits its full
        # 300 s on the other ranks
        close()
    return total / max(steps, 1), steps, samples


def choose_heads(
    fit: Fit, fallback: dict[str, tuple[float, dict[str, Any], str]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The final weights: each part's best epoch, and per fallback task the best linear candidate where no
    trained epoch beat its validation loss at the best epoch; (state, task -> "trained" | the candidate's
    name: "baseline", "state probe")."""
    state = {k: v for best in fit.best.values() for k, v in best.state.items()}
    best_epoch = fit.best["tasks"].epoch
    chosen = {}
    for task, (loss, head, name) in fallback.items():
        chosen[task] = name if fit.history[best_epoch][f"valid_loss_{task}"] >= loss else "trained"
        if chosen[task] != "trained":
            state.update(head)
    return state, chosen


def reduce_totals(process: Process, fit: Fit) -> Fit:
    """Samples and fit seconds summed over the ranks (a collective: every rank calls it)."""
    if not process.distributed:
        return fit
    import torch
    import torch.distributed as dist

    totals = torch.tensor([fit.samples, fit.fit_seconds], dtype=torch.float64)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return Fit(fit.history, fit.best, int(totals[0]), float(totals[1]) / process.world)


def finalize(
    job: TrainJob,
    process: Process,
    setup: Setup,
    fit: Fit,
    state: dict[str, Any],
    heads: dict[str, str],
    started: float,
) -> TrainSummary:
    """Rank 0: the test metrics of the final weights, the artifact directory, the summary."""
    from userlens.models.predictor import BehaviourModel, write_artifact

    catalogue = setup.catalogue
    dp = None
    if job.dp is not None:
        dp = {
            "epsilon": float(setup.privacy_engine.get_epsilon(job.dp.target_delta)),
            "delta": job.dp.target_delta,
            "target_epsilon": job.dp.target_epsilon,
            "max_grad_norm": job.dp.max_grad_norm,
            "noise_multiplier": float(setup.optimizer.noise_multiplier),
            "accountant": "rdp",
            "sampling": "poisson",
            "unit": "user",
        }
    final = BehaviourModel(job.config, (catalogue.embeddings, catalogue.log_q) if catalogue else None)
    final.load_state_dict(state)
    test_files = list_files(f"{job.snapshot}/split=test")
    test = evaluate_files(
        final, job.config, job.features, test_files, predictions_to=f"{job.artifact}/test_predictions.npz"
    )
    if catalogue is not None and job.recommend is not None:
        test["recommend"] = evaluate_recommendations(
            final, job.features, list(job.config.tasks), test_files, catalogue, job.recommend.k
        )
    rec_best = fit.best.get("recommend")
    info = TrainingInfo(
        best_epoch=fit.best["tasks"].epoch,
        best_valid_loss=fit.best["tasks"].loss,
        epochs_run=len(fit.history),
        samples=fit.samples,
        fit_seconds=fit.fit_seconds,
        samples_per_second=fit.samples / max(fit.fit_seconds, 1e-9),
        world_size=process.world,
        device=str(process.device),
        train_seconds=time.perf_counter() - started,
        best_rec_epoch=rec_best.epoch if rec_best else None,
        best_valid_rec_loss=rec_best.loss if rec_best else None,
        baseline_fallback=heads,
        dp=dp,
    )
    recommendations = None
    if catalogue is not None:  # side by side, for the report
        recommendations = {
            "userlens (sequential)": test["recommend"],
            "popularity": job.baseline.get("recommend_popularity", {}),
            "ALS": job.baseline.get("recommend_als", {}),
        }
    metrics = ModelMetrics(
        job.version, job.snapshot_id, test, job.baseline, job.data, info, fit.history, recommendations
    )
    write_artifact(
        job.artifact,
        job.config,
        job.features,
        state,
        metrics.to_json(),
        (catalogue.item_ids, catalogue.embeddings, catalogue.log_q) if catalogue else None,
    )
    return TrainSummary(info, test)


def hand_over(process: Process, summary: TrainSummary | None) -> TrainSummary:
    """Every rank returns rank 0's summary. TorchDistributor runs every rank through one generated script
    that pickles the rank's return value to one output file per Spark task; in local mode all ranks share
    that task, so the last rank to exit wins."""
    if process.distributed:
        import torch.distributed as dist

        box = [summary]
        dist.broadcast_object_list(box, src=0, group=process.handoff)
        summary = box[0]
    assert summary is not None
    return summary


def evaluate_files(
    model: Any, config: Any, features: Any, files: list[str], predictions_to: str | None = None
) -> dict[str, dict[str, float]]:
    """Test metrics of ``model`` on snapshot files: binary metrics per binary task, accuracy and
    top-3 accuracy for next_category (users with a label only). ``predictions_to``: also write the
    labels and probabilities (no user keys) as an ``.npz`` file there, for the report's curves."""
    from userlens.models import metrics as M
    from userlens.models.predictor import predict
    from userlens.models.tasks import MULTICLASS_TASKS

    tasks = list(config.tasks)
    parts = list(ShardReader(files, features, tasks).batches(1 << 30, None))
    if not parts:
        raise ValueError("the test split is empty")
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    probs = predict(model, merged["x"])
    if predictions_to:
        save_predictions(predictions_to, {t: merged[t] for t in tasks}, probs)
    return {
        task: (
            M.multiclass_metrics(merged[task][merged[task] >= 0], probs[task][merged[task] >= 0])
            if task in MULTICLASS_TASKS
            else M.binary_metrics(merged[task], probs[task])
        )
        for task in tasks
    }


def evaluate_recommendations(
    model: Any,
    features: Any,
    tasks: list[str],
    files: list[str],
    catalogue: Catalogue,
    k: int,
    fusion: Any = None,
) -> dict[str, float]:
    """recall@k, nDCG@k and hit rate@k of the recommender (the sequential head, or with ``fusion`` the
    head fused with ALS: :func:`userlens.models.sequential.top_items`) on the users marked ``rec_eval``,
    next purchases not bought before relevant, ranking the whole catalogue minus earlier purchases."""
    weight = fusion.weight if fusion is not None else 0.0
    als = fusion.als if fusion is not None else None
    return recommendations_by_weight(model, features, tasks, files, catalogue, k, als, [weight])[weight]


def recommendations_by_weight(
    model: Any,
    features: Any,
    tasks: list[str],
    files: list[str],
    catalogue: Catalogue,
    k: int,
    als: Any,
    weights: list[float],
    marked: bool = True,
    max_users: int | None = None,
) -> dict[float, dict[str, float]]:
    """:func:`evaluate_recommendations` for each ALS weight of ``weights``, in one pass over the files;
    ``marked`` false: every user with a next purchase (as on the valid split), the first ``max_users`` of
    them in file order where given."""
    reader = ShardReader(files, features, tasks, catalogue)
    ranked: dict[float, list[list[int]]] = {w: [] for w in weights}
    relevant: list[set[int]] = []
    for batch in reader.batches(VALID_BATCH_ROWS, None):
        keep = batch["rec_eval"] if marked else (batch["next"] != catalogue.pad).any(1)
        if max_users is not None:
            keep &= np.cumsum(keep) <= max_users - len(relevant)
        if not keep.any():
            if max_users is not None and len(relevant) >= max_users:
                break
            continue
        tops, nexts = rank_batch(model, batch, keep, catalogue, k, als, weights)
        for w, top in tops.items():
            ranked[w] += top
        relevant += nexts
    return {w: ranking_summary(ranked[w], relevant, k) for w in weights}


def rank_batch(
    model: Any,
    batch: dict[str, np.ndarray],
    keep: np.ndarray,
    catalogue: Catalogue,
    k: int,
    als: Any,
    weights: list[float],
) -> tuple[dict[float, list[list[int]]], list[set[int]]]:
    """For the rows ``keep`` of a :class:`ShardReader` batch: the top ``k`` catalogue rows per ALS weight
    (:func:`userlens.models.sequential.top_items_by_weight`, earlier purchases excluded) and the next
    purchases (the relevant sets)."""
    from userlens.models.sequential import top_items_by_weight

    tops = top_items_by_weight(
        model.rec, batch["hist_idx"][keep], catalogue.pad, batch["bought"][keep], k, als, weights
    )
    ranked = {w: [[i for i in row if i >= 0] for row in top] for w, top in tops.items()}
    return ranked, [{i for i in row if i != catalogue.pad} for row in batch["next"][keep]]


def serving_catalogue(artifact: Any) -> Catalogue:
    """A loaded model's item index for ranking (its head keeps its own item vectors: no embeddings)."""
    rec = artifact.model.rec
    assert rec is not None, "a model with a recommendation head"
    return Catalogue(
        artifact.item_ids, np.zeros((rec.n_items, 1), np.float32), np.zeros(rec.n_items), rec.config.max_len
    )


def fuse_with_als(
    artifact: Any, snapshot: str, als_items: dict[str, list[float]], setting: Any, k: int, max_users: int
) -> Any:
    """The shipped recommender of a trained model: its sequential head plus ALS (``als_items``, the item
    factors of the tuned baseline, folded in per user), the ALS weight chosen from ``FUSION_WEIGHTS`` by
    recall@k on (the first ``max_users`` of) the valid split's users with a next purchase (ties: the
    smaller weight; 0 is the head alone). Returns (Fusion, {weight: valid recall@k})."""
    from userlens.models.als import FUSION_WEIGHTS, FoldIn, Fusion

    rank = len(next(iter(als_items.values()))) if als_items else 1
    items = np.zeros((len(artifact.item_ids), rank), np.float32)
    for row, item in enumerate(artifact.item_ids):
        if item in als_items:
            items[row] = als_items[item]
    als = FoldIn(items, setting.reg_param, setting.alpha)
    catalogue = serving_catalogue(artifact)
    files = list_files(f"{snapshot}/split=valid")
    tasks = list(artifact.config.tasks)
    summaries = recommendations_by_weight(
        artifact.model, artifact.features, tasks, files, catalogue, k, als, list(FUSION_WEIGHTS), False, max_users
    )
    valid = {w: summaries[w].get(f"recall@{k}", 0.0) for w in FUSION_WEIGHTS}
    best = max(FUSION_WEIGHTS, key=lambda w: (valid[w], -w))
    return Fusion(als, best), valid


def add_fusion(
    path: str, snapshot: str, als_items: dict[str, list[float]], setting: Any, k: int, max_users: int
) -> dict[str, float]:
    """Choose the ALS weight of the model at ``path`` on validation (:func:`fuse_with_als`), write it into
    the model directory, score the test users once with it, and make it the model's recommendation
    metrics in ``metrics.json`` (the head alone stays as ``userlens (sequential)``). Returns the fused
    test metrics with ``als_weight``."""
    from userlens.models.als import write_fusion
    from userlens.models.predictor import load_artifact
    from userlens.models.storage import read_json, write_json

    artifact = load_artifact(path)
    fusion, valid = fuse_with_als(artifact, snapshot, als_items, setting, k, max_users)
    write_fusion(path, fusion)
    catalogue = serving_catalogue(artifact)
    test = evaluate_recommendations(
        artifact.model,
        artifact.features,
        list(artifact.config.tasks),
        list_files(f"{snapshot}/split=test"),
        catalogue,
        k,
        fusion,
    )
    fused = {**test, "als_weight": fusion.weight, f"valid_recall@{k}": valid[fusion.weight]}
    metrics = read_json(f"{path}/metrics.json")
    head = metrics["model"].get("recommend", {})
    metrics["model"]["recommend"] = fused
    metrics["recommendations"] = {
        "userlens": fused,
        "userlens (sequential)": head,
        **{
            name: values
            for name, values in (metrics.get("recommendations") or {}).items()
            if name != "userlens (sequential)"
        },
    }
    write_json(f"{path}/metrics.json", metrics)
    log.info(
        "train: recommender = sequential head + %g x ALS (valid recall@%d by weight: %s)",
        fusion.weight,
        k,
        ", ".join(f"{w:g} {v:.3f}" for w, v in valid.items()),
    )
    return fused


def read_test_set(artifact: Any, files: list[str], k: int, centroids: np.ndarray | None = None) -> Any:
    """The test split's labels, the shipped model's probabilities and top ``k`` recommendations (the head
    fused with ALS where the model has a fusion) and what :mod:`userlens.models.quality` groups users by: the
    activity, and with ``centroids`` each user's nearest segment (computed batch by batch: the embeddings
    are not kept)."""
    from userlens.models.predictor import predict
    from userlens.models.quality import Holdout, nearest_segment

    tasks = list(artifact.config.tasks)
    catalogue = serving_catalogue(artifact) if artifact.config.rec else None
    fusion = artifact.fusion  # the recommender as it ships: the head fused with ALS (None: the head alone)
    weight, als = (fusion.weight, fusion.als) if fusion is not None else (0.0, None)
    parts: dict[str, list[np.ndarray]] = {"segment": [], "activity": [], **{t: [] for t in tasks}}
    probs: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    ranked: list[list[int]] = []
    relevant: list[set[int]] = []
    rec_rows: list[np.ndarray] = []
    seen = 0
    reader = ShardReader(files, artifact.features, tasks, catalogue, keep_embedding=centroids is not None)
    for batch in reader.batches(VALID_BATCH_ROWS, None):
        n = len(batch["x"])
        if centroids is not None:
            parts["segment"].append(nearest_segment(batch["embedding"], centroids))
        parts["activity"].append(batch.get("activity", np.zeros(n)))
        predicted = predict(artifact.model, batch["x"])
        for task in tasks:
            probs[task].append(predicted[task])
            parts[task].append(batch[task])
        if catalogue is not None and batch["rec_eval"].any():
            keep = batch["rec_eval"]
            tops, nexts = rank_batch(artifact.model, batch, keep, catalogue, k, als, [weight])
            ranked += tops[weight]
            relevant += nexts
            rec_rows.append(seen + np.flatnonzero(keep))
        seen += n
    if not seen:
        raise ValueError("the test split is empty")
    merged = {key: np.concatenate(values) for key, values in parts.items() if values}
    with_next = [i for i, r in enumerate(relevant) if r]  # judged: users with a next purchase
    rows = np.concatenate(rec_rows) if rec_rows else np.zeros(0, np.int64)
    return Holdout(
        labels={t: merged[t] for t in tasks},
        probs={t: np.concatenate(probs[t]) for t in tasks},
        activity=merged["activity"],
        segment=merged.get("segment"),
        ranked=[ranked[i] for i in with_next],
        relevant=[relevant[i] for i in with_next],
        rec_rows=rows[with_next] if len(rows) else rows,
    )


def write_quality_by_group(path: str, snapshot: str, k: int, min_users: int, segments: Any) -> dict[str, Any]:
    """Compute the model's quality by activity decile and by published segment
    (:func:`userlens.models.quality.quality_by_group`, ``segments``: a
    :class:`~userlens.models.quality.Segments` or None) on its snapshot's test split and write it into its
    ``metrics.json`` as ``by_group``. Returns it."""
    from userlens.models.predictor import load_artifact
    from userlens.models.quality import quality_by_group
    from userlens.models.storage import read_json, write_json

    artifact = load_artifact(path)
    centroids = segments.centroids if segments is not None else None
    test = read_test_set(artifact, list_files(f"{snapshot}/split=test"), k, centroids)
    by_group = quality_by_group(test, list(artifact.config.tasks), k, min_users, segments)
    metrics = read_json(f"{path}/metrics.json")
    metrics["by_group"] = by_group
    write_json(f"{path}/metrics.json", metrics)
    return by_group


def ranking_summary(ranked: list[list[Any]], relevant: list[set[Any]], k: int) -> dict[str, float]:
    """recall@k, ndcg@k, hit_rate@k over users with at least one relevant item, and their count."""
    from userlens.models import metrics as M

    pairs = [(r, s) for r, s in zip(ranked, relevant) if s]
    if not pairs:
        return {"users": 0}
    r, s = [p[0] for p in pairs], [p[1] for p in pairs]
    return {
        f"recall@{k}": M.recall_at_k(r, s, k),
        f"ndcg@{k}": M.ndcg_at_k(r, s, k),
        f"hit_rate@{k}": M.hit_rate_at_k(r, s, k),
        "users": len(pairs),
    }


def save_predictions(uri: str, labels: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> None:
    """``<task>.y`` and ``<task>.p`` arrays in one .npz file (no user keys)."""
    import io

    from userlens.models.storage import write_bytes

    buffer = io.BytesIO()
    # Any: numpy types **kwds so that a dict[str, ndarray] could also fill its allow_pickle: bool
    ys: dict[str, Any] = {f"{t}.y": labels[t] for t in labels}
    ps: dict[str, Any] = {f"{t}.p": probs[t] for t in probs}
    np.savez_compressed(buffer, **ys, **ps)
    write_bytes(uri, buffer.getvalue())


HEAD_CANDIDATES = {"baseline": "baseline_heads", "state probe": "probe_heads"}  # name -> TrainJob field


def _baseline_candidates(
    job: TrainJob, valid: ShardReader, tasks: list[str], process: Process
) -> dict[str, tuple[float, dict[str, Any], str]]:
    """Per task, the best of the linear candidates the job carries (the baseline's regression,
    ``job.baseline_heads``; the state probe, ``job.probe_heads``) by validation loss: (that loss, the head's
    parameters ``heads.<task>.*``, the candidate's name); empty without candidates."""
    from dataclasses import replace

    import torch

    from userlens.models.predictor import BehaviourModel

    out: dict[str, tuple[float, dict[str, Any], str]] = {}
    for name, attribute in HEAD_CANDIDATES.items():
        linear = getattr(job, attribute)
        if not linear:
            continue
        with torch.random.fork_rng(devices=[]):  # the trained model's random stream (dropout) stays as without it
            candidate = BehaviourModel(replace(job.config, rec=None))
        candidate.set_linear_heads(linear)
        candidate = candidate.to(process.device)
        losses = _validation_loss(candidate, valid, tasks, process.device, process.distributed)
        state = candidate.state_dict()
        for task in linear:
            loss = losses[f"task:{task}"]
            if task not in out or loss < out[task][0]:
                head = {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith(f"heads.{task}.")}
                out[task] = (loss, head, name)
        if process.rank == 0:
            log.info(
                "the %s as the head: valid loss %s",
                "baseline's regression" if name == "baseline" else name,
                ", ".join(f"{task} {losses[f'task:{task}']:.4f}" for task in linear),
            )
    return out


def _unwrap(model: Any) -> Any:
    inner = getattr(model, "_module", model)  # Opacus GradSampleModule
    return getattr(inner, "module", inner)  # DDP / DPDDP


def _as_numpy_batch(batch: Any, tasks: list[str]) -> dict[str, np.ndarray]:
    x, *labels = batch
    return {"x": x.numpy(), **{t: y.numpy() for t, y in zip(tasks, labels)}}


class _Best:
    """The best validation epoch of one part of the model, its weights, and epochs since."""

    def __init__(self) -> None:
        self.loss, self.epoch, self.bad = math.inf, -1, 0
        self.state: dict[str, Any] = {}

    def update(self, epoch: int, loss: float, state: dict[str, Any]) -> None:
        if loss < self.loss - 1e-6 or self.epoch < 0:  # the first epoch counts even without a finite loss
            self.loss, self.epoch, self.bad = loss, epoch, 0
            self.state = {k: v.detach().cpu().clone() for k, v in state.items()}
        else:
            self.bad += 1


def _validation_loss(
    model: Any,
    valid: ShardReader,
    tasks: list[str],
    device: Any,
    distributed: bool,
    catalogue: Catalogue | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Mean validation loss of the task heads per user (``tasks``, and each task's own under
    ``task:<name>``), and of the recommendation head per positive (the same sampled positives every
    epoch); sums all-reduced over ranks."""
    import torch
    import torch.distributed as dist

    from userlens.models.predictor import task_losses

    inner = _unwrap(model)
    inner.eval()
    sums = torch.zeros(3 + len(tasks), dtype=torch.float64)  # rows, rec loss, positives, then each task's loss
    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        for batch in valid.batches(VALID_BATCH_ROWS, None):
            x, y = _tensors(batch, tasks, device)
            seq = _rec_tensors(batch, catalogue, rng, device)
            out = inner(x, seq)
            rec = out.pop("recommend", None)
            per_task = task_losses(out, y)
            for i, task in enumerate(tasks):
                sums[3 + i] += float(per_task[task]) * len(x)
            sums[0] += len(x)
            if rec is not None:
                targets = int((seq[:, 1:] > 0).sum())
                sums[1] += float(rec) * targets
                sums[2] += targets
    if distributed:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    if sums[0] == 0:
        raise ValueError("the validation split is empty")
    means = {f"task:{task}": float(sums[3 + i] / sums[0]) for i, task in enumerate(tasks)}
    return {"tasks": sum(means.values()), **means, "recommend": float(sums[1] / sums[2]) if sums[2] > 0 else math.inf}


def _make_private(
    model: Any,
    optimizer: Any,
    train_files: list[str],
    features: Any,
    tasks: list[str],
    job: TrainJob,
    distributed: bool,
) -> tuple[Any, Any, Any, Any]:
    import torch
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from torch.utils.data import DataLoader, TensorDataset

    dp = job.dp
    assert dp is not None
    parts = list(ShardReader(train_files, features, tasks).record_batches(train_files))
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    dataset = TensorDataset(torch.from_numpy(arrays["x"]), *[torch.from_numpy(arrays[t]) for t in tasks])
    loader = DataLoader(dataset, batch_size=job.batch_size, shuffle=True)
    if distributed:
        model = DPDDP(model)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=dp.target_epsilon,
        target_delta=dp.target_delta,
        epochs=job.epochs,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
    )
    return model, optimizer, loader, engine
