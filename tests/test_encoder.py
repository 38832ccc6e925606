"""The encoder against sentence-transformers on the real MiniLM, plus model loading errors and the
device choice (task GPU -> CUDA_VISIBLE_DEVICES -> CPU) with fake task resources. No Spark jobs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from userlens.errors import ConfigError, UserlensError
from userlens.models import encoder as enc
from userlens.models.encoder import describe_model, load_encoder, select_device

TEXTS = [
    "hello",
    "",
    "  bought 2 'Trail Runner X' (outdoor, 89.5)  ",
    "searched \"waterproof jacket\"; viewed 'Storm Shell' (outdoor, 129.0) ×3",
    "Ünïcode and 中文 text: 浏览「登山鞋」",
    "12 events on 4 active days, 2026-10-01 to 2026-10-04. views 8, purchases 1. " * 3,
    # > 256 tokens: truncated the same way by both
    "2026-10-03: viewed 'Deep Work' (books, 12.0); clicked 'Atomic Habits'; added to cart 'Trail Runner X'; " * 40,
    "a " * 600,
]


@pytest.fixture(scope="module")
def minilm() -> enc.Encoder:
    return load_encoder("builtin:minilm", device="cpu")


def _copy_model(source: Path, target: Path) -> Path:
    """A copy of the model directory whose weights are a symlink (cheap; hashed through the link)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    (target / "model.safetensors").symlink_to(source / "model.safetensors")
    return target


def test_equals_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm.info.path), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    got = minilm.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == expected.shape == (len(TEXTS), 384)
    cosine = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.99999, cosine
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_tokens_truncated_and_batches_keep_order(minilm):
    ids = minilm.tokenize(TEXTS)
    assert max(len(row) for row in ids) == minilm.max_seq_length == 256
    assert all(row[0] == minilm.tokenizer.cls_token_id for row in ids)
    # a tiny token budget (many micro-batches) gives the same vectors in the same order
    small = enc.Encoder(minilm.info, minilm.tokenizer, minilm.model, "cpu", minilm.dtype, max_batch_tokens=300)
    assert np.allclose(small.encode_ids(ids), minilm.encode_ids(ids), atol=1e-5)
    assert minilm.encode_ids([]).shape == (0, 384)


def test_encode_stream_keeps_order_and_keys_and_counts_padding(minilm):
    batches = [(f"b{i}", TEXTS[i : i + 3]) for i in range(0, len(TEXTS), 3)]
    stats = enc.EncodeStats()
    out = list(minilm.encode_stream(iter(batches), prefetch=1, stats=stats))
    assert [key for key, _ in out] == [key for key, _ in batches]
    for (_, texts), (_, vectors) in zip(batches, out):
        assert np.allclose(vectors, minilm.encode(list(texts)), atol=1e-5)
    lengths = [len(ids) for ids in minilm.tokenize(TEXTS)]
    assert (stats.texts, stats.tokens) == (len(TEXTS), sum(lengths))
    # each forward pass is as wide as its longest text: what exceeds the real tokens is padding
    assert stats.padded_tokens >= sum(lengths) and stats.batches >= len(batches)
    assert 0 < stats.model_seconds <= stats.wall_seconds


def test_encode_stream_raises_what_the_input_or_the_tokenizer_hit(minilm):
    def broken_input():
        yield "ok", ["fine"]
        raise OSError("the Arrow stream broke")

    with pytest.raises(OSError, match="Arrow stream broke"):
        list(minilm.encode_stream(broken_input(), prefetch=2))

    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("not a text")

    stream = minilm.encode_stream(iter([("a", ["fine"]), ("b", [Unprintable()])]), prefetch=1, threads=2)
    assert next(stream)[0] == "a"
    with pytest.raises(ValueError, match="not a text"):  # raised in a tokenizer thread, re-raised here
        next(stream)


def test_token_batches_respect_the_budget():
    lengths = np.array([300, 256, 128, 128, 64, 10, 3])
    batches = enc._token_batches(lengths, 512)
    assert [(b.start, b.stop) for b in batches] == [(0, 1), (1, 3), (3, 7)]
    assert all(lengths[b][0] * (b.stop - b.start) <= 512 or b.stop - b.start == 1 for b in batches)


def test_model_id_is_content_addressed(minilm, tmp_path):
    assert minilm.model_id.startswith("minilm-l6-v2@") and len(minilm.model_id.split("@")[1]) == 12
    copy = _copy_model(minilm.info.path, tmp_path / "copy")
    same = describe_model(str(copy))
    assert same.model_id.split("@")[1] == minilm.model_id.split("@")[1]  # same files, same hash
    assert same.label == "bert-l6-h384" and same.pooling == "mean" and same.max_seq_length == 256
    # a different pooling is a different model
    pooling = json.loads((copy / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    cls = describe_model(str(copy))
    assert cls.pooling == "cls" and cls.model_id != same.model_id


def test_bare_hf_directory_defaults(minilm, tmp_path):
    bare = _copy_model(minilm.info.path, tmp_path / "bare")
    for name in ("modules.json", "sentence_bert_config.json"):
        (bare / name).unlink()
    shutil.rmtree(bare / "1_Pooling")
    info = describe_model(str(bare))
    assert info.pooling == "mean" and info.max_seq_length == 512  # tokenizer's 512, capped at 512


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("missing", "is not a directory"),
        ("no_config", "has no config.json"),
        ("no_weights", "has no weights"),
        ("bad_json", "cannot read"),
        ("two_poolings", "pooling must be exactly one of"),
    ],
)
def test_bad_model_dir_is_one_line_config_error(minilm, tmp_path, setup, expected):
    path = tmp_path / "model"
    if setup != "missing":
        _copy_model(minilm.info.path, path)
    if setup == "no_config":
        (path / "config.json").unlink()
    elif setup == "no_weights":
        (path / "model.safetensors").unlink()
    elif setup == "bad_json":
        (path / "sentence_bert_config.json").write_text("{not json")
    elif setup == "two_poolings":
        (path / "1_Pooling" / "config.json").write_text(
            json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True})
        )
    with pytest.raises(ConfigError) as info:
        load_encoder(str(path), device="cpu")
    message = str(info.value)
    assert message.startswith("embed.model: ") and expected in message and "\n" not in message


# -- the int8 CPU mode (embed.cpu_int8) -------------------------------------


def test_int8_mode_stays_within_its_drift_and_has_its_own_model_id(minilm):
    int8 = load_encoder("builtin:minilm", device="cpu", int8=True)
    layers = [type(m).__name__ for m in int8.model.modules()]
    assert "FullRangeLinear" in layers and "Linear" in layers  # quantized, the FFN's output kept float32
    texts = [t for t in TEXTS if t.strip()]
    expected, got = minilm.encode(texts), int8.encode(texts)
    drift = 1.0 - (got * expected).sum(axis=1)  # both L2-normalized
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert drift.mean() <= enc.INT8_MAX_DRIFT and drift.max() < 0.03, drift
    assert not np.allclose(got, expected, atol=1e-4)  # it is not the float32 model under another name
    assert int8.model_id.startswith("minilm-l6-v2+int8@") and int8.model_id != minilm.model_id
    assert describe_model("builtin:minilm", int8=True).model_id == int8.model_id


def test_int8_mode_refuses_a_model_that_drifts_too_far(minilm):
    own = enc.Encoder(
        minilm.info, minilm.tokenizer, copy.deepcopy(minilm.model), "cpu", minilm.dtype, minilm.max_batch_tokens
    )
    with pytest.raises(ConfigError) as info:
        enc.quantize_int8(own, max_drift=1e-6)
    message = str(info.value)
    assert message.startswith("embed.cpu_int8: minilm-l6-v2 drifts ") and "\n" not in message
    with pytest.raises(ConfigError, match="embed.cpu_int8: the int8 mode runs on CPU only"):
        load_encoder("builtin:minilm", device="cuda:0", int8=True)


def test_int8_mode_needs_the_cpu_device_in_config():
    from userlens.config import load_settings

    with pytest.raises(ConfigError, match="cpu_int8 runs on CPU only: set device: cpu"):
        load_settings(None, ["embed.cpu_int8=true"])
    assert load_settings(None, ["embed.cpu_int8=true", "embed.device=cpu"]).embed.cpu_int8


def test_unknown_builtin():
    with pytest.raises(ConfigError, match="unknown built-in model"):
        describe_model("builtin:nope")


# -- device choice, with fake task resources -------------------------------
class _FakeContext:
    def __init__(self, addresses):
        from pyspark.resource import ResourceInformation

        self._resources = {"gpu": ResourceInformation("gpu", addresses)} if addresses is not None else {}

    def resources(self):
        return self._resources


@pytest.fixture
def fake_task(monkeypatch):
    from pyspark import TaskContext

    def install(addresses, cuda=True, visible=None):
        monkeypatch.setattr(TaskContext, "get", classmethod(lambda cls: _FakeContext(addresses)))
        monkeypatch.setattr(enc, "_cuda_available", lambda: cuda)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    return install


def test_device_from_task_resources(fake_task):
    fake_task(["3"], visible="0,1,2,3")
    assert select_device("auto") == "cuda:3"
    assert select_device("cuda") == "cuda:3"
    assert select_device("cpu") == "cpu"


def test_device_from_cuda_visible_devices(fake_task):
    fake_task(None, visible="5")
    assert select_device("auto") == "cuda:0"


def test_device_falls_back_to_cpu_unless_cuda_required(fake_task):
    fake_task(None)
    assert select_device("auto") == "cpu"
    with pytest.raises(UserlensError, match="spark.task.resource.gpu.amount"):
        select_device("cuda")
    fake_task(["0"], cuda=False)  # Spark gave a GPU, torch cannot see it
    assert select_device("auto") == "cpu"
    with pytest.raises(UserlensError, match="spark.task.resource.gpu.amount"):
        select_device("cuda")


def test_device_without_a_task(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert select_device("auto") == "cpu"  # on the driver / outside Spark: TaskContext.get() is None


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_close_to_cpu(minilm):
    gpu = load_encoder("builtin:minilm", device="cuda:0", dtype="bfloat16")
    got, expected = gpu.encode(TEXTS), minilm.encode(TEXTS)
    assert ((got * expected).sum(axis=1)).min() >= 0.99
