"""The embed stage on real Spark, real Delta and the real MiniLM: incremental runs, one embedding per
distinct text, empty texts, a changed model, items, GPU configuration checks (no GPU needed)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from conftest import STATE_ON, make_settings
from userlens.embedding import check_gpu_conf, distinct_texts, gpu_profile, item_texts
from userlens.errors import ConfigError, UserlensError
from userlens.models.encoder import describe_model, load_encoder
from userlens.runs import StageRun
from userlens.stages.embed import run_embed
from userlens.tables import Tables, table_schema

D1 = dt.date(2026, 10, 5)
TEXTS = {
    "u1": "5 events on 2 active days. viewed 'Trail Runner X' (outdoor, 89.5); bought 1 'Trail Runner X'",
    "u2": "1 events on 1 active days. viewed 'Deep Work' (books, 12.0)",
    "u3": "1 events on 1 active days. viewed 'Deep Work' (books, 12.0)",  # same text as u2
    "u4": "1 events on 1 active days. viewed 'Deep Work' (books, 12.0)",  # and again
    "u5": "   ",  # blank: skipped
    "u6": '3 events on 1 active days. searched "rain jacket"; reviewed \'Storm Shell\': "great" ' * 30,
}
ITEMS = [
    ("i1", "Trail Runner X", "outdoor", "Peak", 89.5, "A light trail shoe."),
    ("i2", "Deep Work", "books", None, 12.0, None),
    ("i3", None, None, None, 1.0, "  "),
]


# the state texts: u2, u3 and u4 share one, u1 and u6 have their own
STATES = {
    "u1": "Last active 2026-10-05. Open cart: 2026-10-05: added to cart 'Storm Shell' (outdoor, 129.00).",
    "u6": 'Last active 2026-10-04. Last searches: 2026-10-04: searched "rain jacket".',
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def text_rows(spark, texts: dict[str, str], as_of: dt.date = D1, states: dict[str, str] = STATES):
    def state(user: str) -> str:
        return states.get(user, "Last active 2026-10-01.")

    rows = [
        (user, as_of, text, _sha(text), 3, "1", state(user), _sha("state" + state(user)))
        for user, text in texts.items()
    ]
    return spark.createDataFrame(rows, table_schema("user_texts"))


def write_inputs(spark, settings, texts=TEXTS, as_of=D1, items=True):
    tables = Tables(spark, settings.storage)
    tables.merge("user_texts", text_rows(spark, texts, as_of))
    if items:
        df = spark.createDataFrame([(*row, "r0") for row in ITEMS], table_schema("items"))
        tables.merge("items", df)
    return tables


def embed(spark, settings, as_of=None):
    run = StageRun("embed", run_id=f"run-{os.urandom(4).hex()}")
    return run_embed(spark, settings, run, as_of), run


def vectors(tables: Tables, table: str, key: str, column: str = "embedding") -> dict[str, np.ndarray]:
    return {r[key]: np.array(r[column], dtype=np.float32) for r in tables.read(table).select(key, column).collect()}


def _copy_with_shorter_length(tmp_path: Path) -> Path:
    """A copy of MiniLM that reads 128 tokens instead of 256: a different model, so a new model_id."""
    source = describe_model("builtin:minilm").path
    copy = tmp_path / "minilm-128"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    (copy / "model.safetensors").symlink_to(source / "model.safetensors")
    (copy / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return copy


def test_full_incremental_and_model_change(spark, tmp_path):
    # one warehouse for the whole story: Delta table creation dominates small runs
    settings = make_settings(tmp_path, *STATE_ON)
    with pytest.raises(UserlensError, match=r"^no user_texts table: run `userlens textualize` first$"):
        embed(spark, settings)
    tables = write_inputs(spark, settings)

    result, run = embed(spark, settings)
    users = result.users
    # 3 distinct history texts and 3 distinct state texts, in one pass of the encoder
    assert (users.rows, users.embedded, users.texts_embedded, users.unchanged, users.empty) == (6, 5, 6, 0, 1)
    record = result.run_record()  # what its pipeline_runs row holds
    assert (record.rows_in, record.rows_out, run.as_of_date) == (6, 5, D1)
    assert record.details["user_texts_embedded"] == 6 and record.details["users_empty"] == 1
    assert result.model_id == describe_model("builtin:minilm").model_id

    stored = tables.read("user_embeddings")
    assert sorted(r[0] for r in stored.select("user_key").collect()) == ["u1", "u2", "u3", "u4", "u6"]
    assert stored.where(F.col("model_id") != result.model_id).count() == 0
    # the vectors are the encoder's, each for its own user
    got = vectors(tables, "user_embeddings", "user_key")
    encoder = load_encoder("builtin:minilm", device="cpu")
    users_in_order = ["u1", "u2", "u6"]
    expected = encoder.encode([TEXTS[u] for u in users_in_order])
    for user, vector in zip(users_in_order, expected):
        assert got[user].shape == (384,) and float(got[user] @ vector) >= 0.99999
    assert np.array_equal(got["u2"], got["u3"]) and np.array_equal(got["u2"], got["u4"])
    # the state vectors too, each of its own user's state text
    states = vectors(tables, "user_embeddings", "user_key", "state_embedding")
    expected_states = encoder.encode([STATES["u1"], "Last active 2026-10-01.", STATES["u6"]])
    for user, vector in zip(users_in_order, expected_states):
        assert states[user].shape == (384,) and float(states[user] @ vector) >= 0.99999
    assert np.array_equal(states["u2"], states["u4"]) and not np.array_equal(states["u2"], got["u2"])

    # items: the blank catalogue text is skipped, the others embedded
    assert (result.items.rows, result.items.embedded, result.items.empty) == (3, 2, 1)
    assert sorted(vectors(tables, "item_embeddings", "item_id")) == ["i1", "i2"]

    # second run, nothing changed: nothing embedded, nothing written
    version = tables.delta("user_embeddings").history(1).first()["version"]
    again, _ = embed(spark, settings)
    assert (again.users.embedded, again.users.texts_embedded, again.users.unchanged, again.users.empty) == (0, 0, 5, 1)
    assert (again.items.embedded, again.items.unchanged) == (0, 2)
    assert tables.delta("user_embeddings").history(1).first()["version"] == version

    # a new as-of date where only u1's text changed (its state text did not: its vector is reused) and only
    # u2's state text: u1 and u2 are re-embedded, one new text each
    changed = dict(TEXTS, u1=TEXTS["u1"] + "; viewed 'Storm Shell' (outdoor, 129.0)")
    d2 = D1 + dt.timedelta(days=1)
    tables.merge("user_texts", text_rows(spark, changed, d2, dict(STATES, u2="Last active 2026-10-06.")))
    before = vectors(tables, "user_embeddings", "user_key")
    states_before = vectors(tables, "user_embeddings", "user_key", "state_embedding")
    third, run3 = embed(spark, settings)  # the latest date by default
    assert run3.as_of_date == d2
    assert (third.users.embedded, third.users.texts_embedded, third.users.unchanged) == (2, 2, 3)
    after = vectors(tables, "user_embeddings", "user_key")
    states_after = vectors(tables, "user_embeddings", "user_key", "state_embedding")
    assert not np.array_equal(after["u1"], before["u1"]) and np.array_equal(states_after["u1"], states_before["u1"])
    assert np.array_equal(after["u2"], before["u2"]) and not np.array_equal(states_after["u2"], states_before["u2"])
    assert all(np.array_equal(after[u], before[u]) for u in ("u3", "u4", "u6"))
    dates = {r[0]: r[1] for r in tables.read("user_embeddings").select("user_key", "as_of_date").collect()}
    assert dates["u1"] == d2 and dates["u3"] == D1

    with pytest.raises(UserlensError, match="no user_texts for 2020-01-01"):
        embed(spark, settings, dt.date(2020, 1, 1))

    # a different model re-embeds everyone (users and items)
    copy = _copy_with_shorter_length(tmp_path)
    other, run4 = embed(spark, make_settings(tmp_path, f"embed.model={copy}", *STATE_ON))
    assert other.model_id != result.model_id and other.model_id.startswith("bert-l6-h384@")
    assert (other.users.embedded, other.users.texts_embedded, other.users.unchanged) == (5, 7, 0)
    assert (other.items.embedded, other.items.unchanged) == (2, 0)
    assert {r[0] for r in tables.read("user_embeddings").select("model_id").distinct().collect()} == {other.model_id}
    assert other.run_record().details["model_id"] == other.model_id

    # (the int8 CPU mode is a model of its own too: tests/test_encoder.py checks its id and its drift)


def test_bad_model_fails_with_one_line_before_any_write(spark, tmp_path):
    bad = make_settings(tmp_path, f"embed.model={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError) as info:
        embed(spark, bad)
    assert str(info.value).startswith("embed.model: ") and "\n" not in str(info.value)
    assert not Path(tmp_path / "warehouse").exists()


def test_distinct_texts_keep_every_partition_busy_after_a_join(spark):
    """The train stage asks for the texts missing from the stored vectors (an anti-join) and embeds them:
    each of the asked-for partitions must get texts, or the CPU-bound encoder runs on one core."""
    texts = spark.createDataFrame([(f"h{i:03d}", f"text {i}") for i in range(120)] * 2, "text_hash string, text string")
    stored = spark.createDataFrame([(f"h{i:03d}",) for i in range(0, 120, 6)], "text_hash string")
    missing = texts.join(stored, "text_hash", "left_anti")
    sizes = distinct_texts(missing, 2).rdd.glom().map(len).collect()
    assert len(sizes) == 2 and sum(sizes) == 100
    assert min(sizes) >= 30, f"texts per partition: {sizes}"


def test_item_texts_join_non_blank_fields(spark):
    items = spark.createDataFrame([(*row, "r0") for row in ITEMS], table_schema("items"))
    got = {r["item_id"]: r["text"] for r in item_texts(items, ["title", "category", "brand", "description"]).collect()}
    assert got == {"i1": "Trail Runner X. outdoor. Peak. A light trail shoe.", "i2": "Deep Work. books", "i3": ""}


def test_embedding_step_reports_tokens_padding_and_busy_time(spark):
    """The Spark step (prefetching tokenizer thread, length-sorted micro-batches) gives the vectors of a plain
    encode, and its accumulator sums every task's tokens, padding and seconds."""
    from userlens.embedding import EncoderSpec, _StatsParam, embed_texts
    from userlens.models.encoder import EncodeStats, load_encoder

    corpus = [TEXTS["u1"], TEXTS["u2"], TEXTS["u6"], "a short one", "another short text about tents"] * 3
    rows = [(hashlib.sha256(f"{i}{t}".encode()).hexdigest(), t) for i, t in enumerate(corpus)]
    texts = spark.createDataFrame(rows, "text_hash string, text string").repartition(2)
    spec = EncoderSpec("builtin:minilm", device="cpu", max_batch_tokens=1024)
    stats = spark.sparkContext.accumulator(EncodeStats(), _StatsParam())
    previous = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "4")  # several batches in flight per task
    try:
        got = {r[0]: np.array(r[1]) for r in embed_texts(texts, spec, prefetch=2, stats=stats).collect()}
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", previous)
    encoder = load_encoder("builtin:minilm", device="cpu")
    plain = encoder.encode([t for _, t in rows])
    assert all(float(got[h] @ plain[i]) >= 0.99999 for i, (h, _) in enumerate(rows))
    total = stats.value
    lengths = [len(ids) for ids in encoder.tokenize([t for _, t in rows])]
    assert (total.texts, total.tokens) == (len(rows), sum(lengths))
    assert sum(lengths) <= total.padded_tokens and total.padding_waste == 1 - sum(lengths) / total.padded_tokens
    assert 0 < total.model_seconds <= total.wall_seconds and 0 < total.busy <= 1
    summary = total.summary()
    assert summary["tokens_per_s"] > 0 and summary["padding_waste"] == round(total.padding_waste, 4)


# -- GPU configuration, checked without a GPU -------------------------------
def test_gpu_conf_names_the_missing_key():
    assert check_gpu_conf({}, "local[4]") is None  # local: no executors, no stage-level scheduling
    with pytest.raises(ConfigError, match="spark.executor.resource.gpu.amount"):
        check_gpu_conf({"spark.task.resource.gpu.amount": "1"}, "spark://host:7077")
    with pytest.raises(ConfigError, match="spark.task.resource.gpu.amount"):
        check_gpu_conf({"spark.executor.resource.gpu.amount": "1"}, "yarn")
    conf = {"spark.executor.resource.gpu.amount": "2", "spark.task.resource.gpu.amount": "0.5"}
    assert check_gpu_conf(conf, "k8s://https://api:443") == 0.5


def test_gpu_profile_asks_for_one_gpu_per_task(spark):
    profile = gpu_profile(1.0, 2)
    requests = profile.taskResources
    assert requests["gpu"].amount == 1.0 and requests["cpus"].amount == 2


def test_cuda_on_a_cluster_without_gpu_keys_fails_before_any_job(spark, tmp_path, monkeypatch):
    from userlens import embedding

    monkeypatch.setattr(embedding, "spark_conf", lambda session: ("spark://host:7077", {}))
    settings = make_settings(tmp_path, "embed.device=cuda")
    with pytest.raises(ConfigError, match="spark.executor.resource.gpu.amount"):
        embed(spark, settings)
    assert not Tables(spark, settings.storage).exists("user_embeddings")
