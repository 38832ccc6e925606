"""Nightly end to end on real Spark, Delta, MiniLM and TorchDistributor: every stage writes its tables and
its pipeline_runs row; a second run for the same date writes no data file; the next day with new events
for 1% of users re-embeds and re-scores only those; profiles are readable by an independent Delta reader."""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from conftest import SHORT_TEXTS, data_files, make_settings
from userlens.errors import ConcurrentRunError, UserlensError
from userlens.features import latest_per_user
from userlens.privacy import load_key
from userlens.runs import RunLock, RunRecord, StageRun, run_stage
from userlens.sample import SampleSpec, generate_sample, replay_day
from userlens.stages.nightly import run_nightly, train_due
from userlens.stages.score import run_score
from userlens.tables import TABLES, Tables

USERS, DAYS, START = 200, 14, dt.date(2026, 10, 1)
ITEMS = 120  # the catalogue is embedded whole; 400 items (the sample's default) cost more than the users
LAST = START + dt.timedelta(days=DAYS - 1)
OVERRIDES = [
    "train.epochs=4",
    "train.patience=2",
    "train.batch_size=32",
    "train.min_users=40",
    "train.min_class_users=3",
    "train.num_processes=1",  # two DDP processes: tests/test_train.py and the cluster test
    "profile.segments=4",
    "privacy.min_segment_size=10",
    "nightly.report=false",
    SHORT_TEXTS,
]
# the quality gate as configured by default
DRILL = OVERRIDES
# the 1%-active day is a sliver of a real day's feed: the gate's row check would rightly refuse it
SLIVER = [*OVERRIDES, "gate.min_rows_ratio=0.001"]


@pytest.fixture(scope="module")
def night(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    settings = make_settings(root, *OVERRIDES)
    generate_sample(
        spark, settings.source.path, SampleSpec(users=USERS, days=DAYS, items=ITEMS, seed=5, start_date=START)
    )
    first = run_nightly(spark, settings, load_key(settings.privacy))
    return root, settings, first


def test_first_night_runs_every_stage(spark, night):
    _, settings, first = night
    tables = Tables(spark, settings.storage)
    assert first.as_of_date == LAST
    assert list(first.stages) == [
        "ingest",
        "textualize",
        "embed",
        "train",
        "score",
        "gate",
        "profile",
        "quarantine_retention",
        "privacy_check",
    ]  # local.yaml: nightly.privacy_check; conftest: explain.users none (tests/test_explain.py explains)
    users = tables.read("user_embeddings").count()
    assert users > 150
    assert first.stages["score"].scored == users
    profiles = tables.read("user_profiles")
    assert profiles.count() == users
    row = profiles.where(F.col("segment_id").isNotNull()).first()
    assert row is not None and 0.0 <= row["purchase_propensity"] <= 1.0 and 0.0 <= row["churn_risk"] <= 1.0
    assert len(row["embedding"]) == 384 and 1 <= len(row["top_categories"]) <= 3
    assert row["model_version"] == first.stages["train"].version
    assert profiles.where(F.col("recency_days") < 0).count() == 0

    # recommendations: k catalogue items per user, never an item the user already bought
    k = settings.train.recommend.k
    recs = {r["user_key"]: r["recommended_items"] for r in profiles.select("user_key", "recommended_items").collect()}
    assert all(items is not None and len(items) == k == len(set(items)) for items in recs.values())
    catalogue = {r[0] for r in tables.read("items").select("item_id").collect()}
    assert set().union(*recs.values()) <= catalogue
    bought = (
        tables.read("events")
        .where(F.col("event_type") == "purchase")
        .groupBy("user_key")
        .agg(F.collect_set("item_id").alias("b"))
        .collect()
    )
    assert sum(bool(r["b"]) for r in bought) > 50
    assert all(not set(recs[r["user_key"]]) & set(r["b"]) for r in bought if r["user_key"] in recs)
    assert len({tuple(v) for v in recs.values()}) > 5  # personal, not one list for everyone
    runs = tables.read("pipeline_runs").where(F.col("as_of_date") == F.lit(LAST))
    assert {r["stage"] for r in runs.select("stage").collect()} >= {
        "ingest",
        "textualize",
        "embed",
        "train",
        "score",
        "profile",
    }
    assert runs.where(F.col("status") != "succeeded").count() == 0
    # the train stage embedded only the cutoff texts that user_embeddings did not hold: those of users
    # with no event since the cutoff (the churned: both classes are in the set) are today's texts
    trained = json.loads(runs.where(F.col("stage") == "train").first()["details"])
    assert 0 < trained["cutoff_texts_embedded"] < sum(trained["users"].values())
    # the model's quality by group: activity quantiles from train; by segment from profile, which found the
    # model computed without a segment model (there was none at training time) and computed it
    from userlens.artifacts import ModelStore

    version = first.stages["train"].version
    by_group = ModelStore.of(settings).metrics(version).by_group
    assert by_group is not None and by_group["activity"]["groups"]
    assert by_group["segment"]["segment_model_version"] == first.stages["profile"].segment_model
    shown = by_group["segment"]["groups"]
    assert len(shown) + by_group["segment"]["suppressed"] > 0  # ~30 test users: segments may all be small
    assert all(r["users"] >= 10 and 0 <= r["purchase"]["ece"] <= 1 for r in shown)
    assert json.loads(runs.where(F.col("stage") == "profile").first()["details"])["quality_by_segment_of"] == version
    # segments below privacy.min_segment_size are published nowhere
    small = tables.read("segments").where(F.col("users") < 10)
    assert small.where(F.col("published") | F.col("top_categories").isNotNull()).count() == 0
    hidden = [r[0] for r in small.select("segment_id").collect()]
    if hidden:
        assert profiles.where(F.col("segment_id").isin(hidden)).count() == 0


def test_score_and_evaluate_give_the_same_top_k_with_the_trained_model(spark, night):
    """The model `train` saved, read back from its artifact: the top-K that `score` published equals the
    ranking `userlens evaluate` makes with the same classes (SequentialEncoder.scores over each user's
    history, fused with the artifact's ALS fold-in by evaluate's per-user standardisation, then
    eval.baselines.rank_batch with the user's purchases as the seen items)."""
    import numpy as np
    import pandas as pd

    from userlens.artifacts import ModelStore
    from userlens.eval.baselines import rank_batch
    from userlens.eval.ranking import normalised
    from userlens.features import item_history
    from userlens.models.predictor import load_artifact

    _, settings, first = night
    tables = Tables(spark, settings.storage)
    store = ModelStore.of(settings)
    assert store.latest() == first.stages["train"].version
    artifact = load_artifact(store.path(first.stages["train"].version))
    index = pd.Index(artifact.item_ids)
    history = item_history(tables.read("events"), LAST, LAST, artifact.config.rec["max_len"])
    published = tables.read("user_scores").where(F.col("as_of_date") == F.lit(LAST))
    rows = history.join(published.select("user_key", "recommended_items"), "user_key").collect()
    assert len(rows) > 150

    def indices(items):
        found = index.get_indexer(items)
        return found[found >= 0]

    histories = [indices(r["hist_items"])[::-1] for r in rows]  # oldest first, as evaluate's folds hold them
    seen = [indices(r["bought"]) for r in rows]
    scores = artifact.model.rec.scores(histories)
    fusion = artifact.fusion  # the head fused with ALS (fold-in), as evaluate fuses: standardised per user
    assert fusion is not None
    if fusion.weight > 0:
        pad = len(artifact.item_ids)
        hist_idx, bought = np.full((len(rows), 50), pad), np.full((len(rows), 50), pad)
        for row, (h, b) in enumerate(zip(histories, seen)):
            hist_idx[row, : len(h)], bought[row, : len(b)] = h[::-1], b
        als = fusion.als.scores(hist_idx, pad, bought).numpy()
        scores = (normalised(scores, seen) + fusion.weight * normalised(als, seen)).numpy()
    tops, _ = rank_batch(scores, seen, None, settings.train.recommend.k)
    ids = np.array(artifact.item_ids, dtype=object)
    assert [ids[t].tolist() for t in tops] == [r["recommended_items"] for r in rows]


def test_profiles_are_readable_by_an_independent_delta_reader(spark, night):
    from deltalake import DeltaTable

    _, settings, _ = night
    tables = Tables(spark, settings.storage)
    independent = DeltaTable(tables.location("user_profiles")).to_pyarrow_table()
    assert independent.num_rows == tables.read("user_profiles").count()
    assert independent.column_names == tables.read("user_profiles").columns
    props = DeltaTable(tables.location("user_profiles")).metadata().configuration
    assert props.get("delta.enableChangeDataFeed") == "true"


# A second nightly for the same date writes no data file: tests/test_databricks.py runs the job's stage notebooks
# and the nightly notebook on one warehouse and checks that what each wrote the other left as it was, and
# tests/test_privacy_check.py that a second check scans only what was added since the passing one (the
# run that checked both here cost a minute of the suite's 25).


def test_next_day_with_one_percent_active_reembeds_and_rescores_only_them(spark, night):
    root, settings, first = night
    tables = Tables(spark, settings.storage)
    day = LAST + dt.timedelta(days=1)
    active = replay_day(settings.source.path, LAST, day, n_users=2)
    assert train_due(settings, day) is None
    settings = make_settings(root, *SLIVER)
    result = run_nightly(spark, settings, load_key(settings.privacy), day)
    assert result.stages["ingest"].rows_out > 0
    assert result.stages["embed"].users.embedded == len(active)
    assert result.stages["score"].scored == len(active)
    scored_today = tables.read("user_scores").where(F.col("as_of_date") == F.lit(day)).count()
    assert scored_today == len(active)
    profiles = tables.read("user_profiles")
    assert profiles.where(F.col("as_of_date") == F.lit(day)).count() == profiles.count()
    # the privacy check scanned the day's new events, not the whole table again
    check = result.stages["privacy_check"]
    scanned = {t.table: t.rows for t in check.tables}
    assert not check.scope.full and scanned["events"] == result.stages["ingest"].rows_out


def write_unpriced_day(raw: str, day: dt.date) -> int:
    """A raw day whose feed lost its prices: the purchases of the last six days, moved to ``day`` with new
    ids and every price 0. Returns the purchases written."""
    lines = []
    for source in (LAST - dt.timedelta(days=back) for back in range(6)):
        for path in sorted((Path(raw) / "events" / f"event_date={source}").glob("part-*")):
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(event, dict) or not str(event.get("ts", "")).startswith(source.isoformat()):
                    continue
                if event.get("event_type") != "purchase":
                    continue
                event.update(ts=day.isoformat() + event["ts"][10:], event_id=f"drill-{event.get('event_id')}")
                if "price" in event:
                    event["price"] = 0.0
                lines.append(event)
    folder = Path(raw) / "events" / f"event_date={day}"
    folder.mkdir(parents=True)
    (folder / "part-00000.txt").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    return sum(e.get("event_type") == "purchase" for e in lines)


def test_a_night_whose_feed_lost_its_prices_is_refused_and_published_only_with_force(spark, night):
    """The drill: nights 1 and 2 published; night 3's feed has every price 0. The gate refuses it:
    user_profiles stays at its version, LATEST stays, user_scores is as published, pipeline_runs names the
    failed check with its figure, the error is one line. Then `userlens publish --force` publishes the night.
    (A refused new model's path, CANDIDATE -> REFUSED -> LATEST under --force: tests/test_gate.py.)"""
    from userlens.artifacts import ModelStore
    from userlens.stages.gate import GateFailed
    from userlens.stages.nightly import run_publish

    root, _, _ = night
    settings = make_settings(root, *DRILL)
    tables, store = Tables(spark, settings.storage), ModelStore.of(settings)
    day = LAST + dt.timedelta(days=2)
    assert write_unpriced_day(settings.source.path, day) >= 20
    published, profiles_version = store.latest(), tables.version("user_profiles")

    def newest_scores():
        rows = latest_per_user(tables.read("user_scores"), "as_of_date").collect()
        return sorted((r["user_key"], str(r["as_of_date"]), r["model_version"], r["purchase_propensity"]) for r in rows)

    scores_before = newest_scores()
    with pytest.raises(GateFailed) as err:
        run_nightly(spark, settings, load_key(settings.privacy), day)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"gate refused the night of {day}: prices: 100.0% of the night's ")
    assert store.latest() == published and store.candidate() is None and store.refused() is None
    assert tables.version("user_profiles") == profiles_version
    assert newest_scores() == scores_before  # the night's scores (every user, by the new model) restored
    gate = (
        tables.read("pipeline_runs").where((F.col("stage") == "gate") & (F.col("as_of_date") == F.lit(day))).collect()
    )
    assert [r["status"] for r in gate] == ["failed"]
    details = json.loads(gate[0]["details"])
    assert details["failed_checks"] == ["prices"] and details["candidate"] is None
    prices = next(c for c in details["checks"] if c["name"] == "prices")
    assert prices["value"] == pytest.approx(1.0) and prices["limit"] == settings.gate.max_unpriced_increase
    assert details["scores_restored_to"] is not None

    result = run_publish(spark, settings, day, force=True)
    assert result.stages["gate"].forced and not result.stages["gate"].passed
    assert store.latest() == published
    rescored = result.stages["score"].scored
    assert rescored > 20  # the buyers of the corrupted day, scored again and published
    profiles = tables.read("user_profiles")
    assert profiles.where(F.col("as_of_date") == F.lit(day)).count() == profiles.count() > 150


def test_a_table_from_an_older_userlens_gains_the_new_columns(spark, tmp_path):
    """user_scores written before recommended_items, explanations and the column comments existed: the
    columns are added with their comments, every column gets its comment, rows are kept."""
    from pyspark.sql import types as T

    settings = make_settings(tmp_path)
    location = Tables(spark, settings.storage).location("user_scores")
    old = TABLES["user_scores"].schema
    old_schema = T.StructType(
        [
            T.StructField(f.name, f.dataType, f.nullable)
            for f in old
            if f.name not in ("recommended_items", "explanations")
        ]
    )
    row = {
        "user_key": "u1",
        "as_of_date": LAST,
        "model_version": "v0",
        "text_hash": "h",
        "purchase_propensity": 0.5,
        "churn_risk": 0.1,
        "next_category": "pets",
        "next_category_p": 0.3,
        "scored_at": dt.datetime(2026, 10, 1),
    }
    spark.createDataFrame([row], old_schema).write.format("delta").save(location)
    tables = Tables(spark, settings.storage)
    upgraded = tables.read("user_scores")
    assert upgraded.columns == [f.name for f in old.fields]
    assert upgraded.count() == 1 and upgraded.first()["recommended_items"] is None
    assert upgraded.first()["explanations"] is None
    stored = spark.read.format("delta").load(location).schema
    assert {f.name: f.metadata.get("comment") for f in stored} == {f.name: f.metadata["comment"] for f in old}


def test_every_column_of_every_table_has_its_comment_and_profiles_name_their_models(spark, night):
    """After a nightly (tables created, merged, overwritten, replaced by date), each column still carries the
    Delta comment the table contract declares; each profile names its encoder and, in a published segment, its
    segment model."""
    from pyspark.sql import functions as F

    _, settings, _ = night
    tables = Tables(spark, settings.storage)
    checked = 0
    for name, spec in TABLES.items():
        if not tables.exists(name):
            continue
        stored = spark.read.format("delta").load(tables.location(name)).schema
        assert {f.name: f.metadata.get("comment") for f in stored} == {
            f.name: f.metadata["comment"] for f in spec.schema
        }, name
        checked += 1
    assert checked >= 10
    profiles = tables.read("user_profiles")
    model_id = tables.read("user_embeddings").select("model_id").distinct().collect()
    assert [r[0] for r in profiles.select("embedding_model_id").distinct().collect()] == [model_id[0][0]]
    segment_version = tables.read("segments").select("model_version").distinct().collect()[0][0]
    in_segment = profiles.where(F.col("segment_id").isNotNull())
    assert in_segment.count() > 0
    assert in_segment.where(F.col("segment_model_version") != segment_version).count() == 0
    assert profiles.where(F.col("segment_id").isNull() & F.col("segment_model_version").isNotNull()).count() == 0


def test_a_second_nightly_while_one_holds_the_lock_fails_in_one_line_and_changes_nothing(spark, night):
    _, settings, _ = night
    tables = Tables(spark, settings.storage)
    before = data_files(tables)
    with RunLock(tables, "nightly", "other-run", lease_hours=1):
        with pytest.raises(
            ConcurrentRunError,
            match=r"^another nightly run \(other-run on .*\) holds the "
            r"warehouse's run lock until .*; this run did nothing",
        ) as err:
            run_nightly(spark, settings, load_key(settings.privacy), LAST)
        assert "\n" not in str(err.value)
    assert data_files(tables) == before
    assert tables.read("run_locks").count() == 0  # released


def test_exactly_one_of_two_simultaneous_lock_takers_wins(spark, night):
    """Two runs take the lock at the same moment: Delta orders them; one holds it, the other fails."""
    _, settings, _ = night
    tables = Tables(spark, settings.storage)
    start = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def take(run_id: str) -> None:
        lock = RunLock(Tables(spark, settings.storage), "race", run_id, lease_hours=1)
        start.wait()
        try:
            lock.acquire()
            outcome[run_id] = "held"
        except ConcurrentRunError as exc:
            outcome[run_id] = str(exc)

    threads = [threading.Thread(target=take, args=(f"run-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, o in outcome.items() if o == "held"]
    assert len(outcome) == 2 and len(winners) == 1, outcome
    loser = next(o for o in outcome.values() if o != "held")
    assert loser.startswith("another race run") and "\n" not in loser
    assert [r["run_id"] for r in tables.read("run_locks").where("name = 'race'").collect()] == winners


def test_an_expired_lock_is_taken_over(spark, night):
    _, settings, _ = night
    tables = Tables(spark, settings.storage)
    dead = RunLock(tables, "stale", "dead-run", lease_hours=1e-9)
    dead.acquire()  # its lease expires at once; its holder never releases it
    fresh = RunLock(tables, "stale", "new-run", lease_hours=1)
    fresh.acquire()
    assert [r["run_id"] for r in tables.read("run_locks").where("name = 'stale'").collect()] == ["new-run"]
    fresh.release()
    assert tables.read("run_locks").where("name = 'stale'").count() == 0


def test_a_retried_stage_under_the_same_run_id_replaces_its_row(spark, tmp_path, monkeypatch):
    """pipeline_runs has one row per (run_id, stage): a stage's first row is appended; a retry under the
    same run id (a Databricks task retried with its USERLENS_RUN_ID) replaces it instead of adding one."""
    settings = make_settings(tmp_path)
    monkeypatch.setenv("USERLENS_RUN_ID", "retried-run")

    @dataclass(frozen=True)
    class Done:  # a stage result: its row's counts and details come from it
        def run_record(self) -> RunRecord:
            return RunRecord(9, 7, {"said": "once"})

    def fail(run: StageRun) -> None:
        raise UserlensError("the first attempt fails", rows_in=9, details={"dates": ["2026-10-01"]})

    def succeed(run: StageRun) -> Done:
        return Done()

    with pytest.raises(UserlensError, match="first attempt"):
        run_stage("score", settings, spark, fail)
    failed = Tables(spark, settings.storage).read("pipeline_runs").first()
    assert (failed["status"], failed["rows_in"], failed["rows_out"]) == ("failed", 9, None)
    assert json.loads(failed["details"]) == {"dates": ["2026-10-01"], "error": "UserlensError: the first attempt fails"}
    assert run_stage("score", settings, spark, succeed) == Done()
    assert run_stage("profile", settings, spark, succeed) == Done()
    rows = Tables(spark, settings.storage).read("pipeline_runs").orderBy("stage").collect()
    assert [(r["run_id"], r["stage"], r["status"], r["rows_in"], r["rows_out"]) for r in rows] == [
        ("retried-run", "profile", "succeeded", 9, 7),
        ("retried-run", "score", "succeeded", 9, 7),
    ]
    assert {json.loads(r["details"])["said"] for r in rows} == {"once"}


def test_score_without_a_model_names_the_command(spark, tmp_path):
    settings = make_settings(tmp_path)
    with pytest.raises(UserlensError, match=r"^no model in .*: run `userlens train` first$"):
        run_score(spark, settings, StageRun("score", "r"))


def test_status_reads_the_warehouse_from_the_delta_logs_without_spark(spark, night, monkeypatch, capsys):
    """`userlens status --json` on the nightly's warehouse: every table's rows and version as Spark sees them,
    the last run of each stage, the published model; no Spark session is asked for."""
    import json as json_module

    import userlens.spark
    from userlens import cli
    from userlens.artifacts import ModelStore

    root, settings, _ = night

    def no_spark(*args, **kwargs):
        raise AssertionError("userlens status must not start Spark")

    monkeypatch.setattr(userlens.spark, "get_spark", no_spark)
    monkeypatch.chdir(root)  # make_settings' paths are absolute; the default conf's would be relative
    overrides = [f"storage.warehouse={settings.storage.warehouse}", f"storage.models={settings.storage.models}"]
    assert cli.main(["status", "--json", *sum((["--set", o] for o in overrides), [])]) == 0
    status = json_module.loads(capsys.readouterr().out)
    tables = Tables(spark, settings.storage)
    shown = {t["name"]: t for t in status["tables"]}
    for name in ("events", "user_texts", "user_embeddings", "user_scores", "user_profiles", "pipeline_runs"):
        assert shown[name]["rows"] == tables.read(name).count(), name
        assert shown[name]["version"] == tables.version(name), name
    runs = {r["stage"]: r for r in status["runs"]}
    assert {"ingest", "textualize", "embed", "train", "score", "profile"} <= set(runs)
    assert all(r["status"] == "succeeded" for r in runs.values())
    assert status["model"]["version"] == ModelStore.of(settings).latest()
    held = tables.read("run_locks").where("expires_at > current_timestamp()").select("name").collect()
    if held:  # the lock tests of this module leave theirs behind
        assert status["lock"]["name"] in {r[0] for r in held}
    else:
        assert status["lock"] is None
    assert cli.main(["status", *sum((["--set", o] for o in overrides), [])]) == 0
    text = capsys.readouterr().out
    assert "user_profiles" in text and f"model: {status['model']['version']}" in text
