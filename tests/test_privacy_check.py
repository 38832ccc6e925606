"""Privacy on a full demo run: log hygiene, key ids, `userlens privacy-check`, DP metadata of user_profiles.

One `userlens demo` runs as a subprocess (small settings, DP-SGD on, a planted HMAC key) with all of its
stdout and stderr (JVM and Python workers included) captured; every test of the first part reads that
run's output, warehouse, models and report. The second part checks the scanner's transforms on inline
rows. Real Spark, real Delta, real MiniLM and Opacus."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyspark.sql import functions as F

from conftest import NO_EXPLAIN, SPARK_OVERRIDES, make_settings
from userlens.cli import main as cli_main
from userlens.errors import SecretError
from userlens.privacy import (
    DP_DELTA_PROPERTY,
    DP_EPSILON_PROPERTY,
    DP_PROPERTY,
    KEY_ID_PROPERTY,
    MODEL_VERSION_PROPERTY,
    load_key,
    model_properties,
    scrub_pii,
)
from userlens.runs import StageRun
from userlens.spark import JVM_BANNER
from userlens.stages.ingest import run_ingest
from userlens.stages.privacy_check import (
    PrivacyCheckFailed,
    format_table,
    pii_counts,
    plan_scope,
    raw_id_hits,
    raw_id_table,
    rows_to_check,
    run_privacy_check,
)
from userlens.stages.profile import run_profile
from userlens.tables import TABLES, Tables

PLANTED_KEY = "pl4nted-HMAC-s3cret-9c1e77b0a2"
USERS = 100
DEMO = [
    "sample.users=100",
    "sample.days=14",
    "sample.items=120",  # the item catalogue is embedded whole: 400 items cost more than the users
    "sample.pii_fraction=0.2",
    "train.epochs=2",
    "train.min_users=30",
    "train.min_class_users=3",
    "train.num_processes=1",
    "train.dp.enabled=true",  # (so no state probe: the fallback is off under DP-SGD)
    "train.text_baseline=false",  # tests/test_train.py fits it
    "train.recommend.enabled=false",
    "profile.segments=3",
    "privacy.min_segment_size=5",
    NO_EXPLAIN,
]

# the formats of lib/userlens/sample.py's _make_pii, written independently of the scrubber's patterns
SAMPLE_PII = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone": r"\+1 \d{3}-555-\d{4}|\(\d{3}\) 555-\d{4}|\+44 20 7946 \d{4}|\b0\d{2} \d{7}\b",
    "card": r"\b\d{4}([ -])\d{4}\1\d{4}\1\d{4}\b",
    "ip": r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
}


def demo_paths(root: Path) -> list[str]:
    return [
        f"storage.warehouse={root / 'warehouse'}",
        f"storage.models={root / 'models'}",
        f"source.path={root / 'raw'}",
        f"sample.out={root / 'raw'}",
        f"nightly.report_dir={root / 'reports'}",
    ]


def demo_settings(root: Path, raw: Path | None = None):
    """In-process settings for the demo's warehouse (or a copy of it under ``root``)."""
    settings = make_settings(root, *DEMO)
    if raw is not None:
        settings = make_settings(root, *DEMO, f"source.path={raw}")
    return settings


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`userlens demo` once, in its own working directory, with everything it prints captured."""
    root = tmp_path_factory.mktemp("demo")
    overrides = [o for o in SPARK_OVERRIDES if not o.startswith("spark.log_level")]  # keep Spark's WARN lines
    command = [sys.executable, "-m", "userlens.cli", "demo", "-v"]  # -v: every log line, Spark's INFO too
    for item in [*overrides, *demo_paths(root), *DEMO]:
        command += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "USERLENS_RUN_ID"}
    env.update({"USERLENS_HMAC_KEY": PLANTED_KEY, "PYTHONUNBUFFERED": "1"})
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800
    )
    seconds = time.perf_counter() - started
    print(f"demo: {seconds:.0f} s, exit {done.returncode}")
    assert done.returncode == 0, done.stdout[-3000:]
    return SimpleNamespace(
        root=root,
        output=done.stdout,
        seconds=seconds,
        key=load_key(make_settings(root).privacy, {"USERLENS_HMAC_KEY": PLANTED_KEY}),
    )


def raw_lines(root: Path) -> list[str]:
    return [
        line
        for path in sorted((root / "raw" / "events").rglob("part-*"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def planted_secrets(root: Path) -> dict[str, set[str]]:
    """What must never leave the pipeline: the key (and its hex and HMAC pads), raw ids, the sample's PII."""
    key = PLANTED_KEY.encode()
    lines = raw_lines(root)
    ids = set(re.findall(r'"user_id":"([^"]+)"', "\n".join(lines)))
    texts = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the sample's broken lines hold no text field that the others do not
        texts += [record.get("query") or "", record.get("review_text") or ""]
    pii = {
        kind: {m.group(0) for text in texts for m in re.finditer(pattern, text)} for kind, pattern in SAMPLE_PII.items()
    }
    return {
        "key": {PLANTED_KEY, key.hex(), bytes(b ^ 0x36 for b in key).hex(), bytes(b ^ 0x5C for b in key).hex()},
        "raw ids": ids,
        **pii,
    }


def leaks(text: str, secrets: dict[str, set[str]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    lowered = text.lower()
    for kind, values in secrets.items():
        if kind == "raw ids":
            hits = [v for v in values if re.search(rf"(?<![\w.@+-]){re.escape(v)}(?![\w@+-])", text)]
        elif kind == "key":
            hits = [v for v in values if v.lower() in lowered]
        else:
            hits = [v for v in values if v in text]
        if hits:
            found[kind] = sorted(hits)[:5]
    return found


def delta_rows(path: Path, column: str) -> list:
    from deltalake import DeltaTable

    return DeltaTable(str(path)).to_pyarrow_table(columns=[column]).column(column).to_pylist()


# --------------------------------------------------------------------------- the demo run


def test_the_demo_leaks_no_key_raw_id_or_pii_into_logs_report_runs_or_metrics(demo):
    secrets = planted_secrets(demo.root)
    assert len(secrets["raw ids"]) >= USERS * 0.9
    for kind in SAMPLE_PII:
        assert len(secrets[kind]) >= 5, f"the sample planted too few {kind} values to test: {secrets[kind]}"
    # everything was captured: our log lines, the JVM's, and the demo's closing table
    assert "userlens INFO nightly: privacy_check" in demo.output
    assert re.search(r"^\d\d:\d\d:\d\d spark (WARN|INFO|ERROR) \S+: ", demo.output, re.M), "no JVM log line captured"
    assert "userlens demo: tables in" in demo.output
    # the JVM's start-up line about the incubator module its launcher adds is filtered out (userlens.spark), while
    # the JVM's log lines above still come through that filter
    assert JVM_BANNER not in demo.output

    reports = sorted((demo.root / "reports").glob("*.html"))
    assert reports
    details = "\n".join(d or "" for d in delta_rows(demo.root / "warehouse" / "pipeline_runs", "details"))
    assert '"key_id"' in details  # ingest's details are there
    metrics = sorted((demo.root / "models").rglob("metrics.json"))
    assert metrics
    places = {
        "stdout+stderr": demo.output,
        "pipeline_runs.details": details,
        **{str(p.relative_to(demo.root)): p.read_text(encoding="utf-8") for p in [*reports, *metrics]},
    }
    found = {place: hit for place, text in places.items() if (hit := leaks(text, secrets))}
    assert found == {}


def test_the_demo_leaves_no_spark_warehouse_in_its_working_directory(demo):
    """Spark's catalog folder goes inside the warehouse, not ./spark-warehouse wherever the command runs."""
    assert not (demo.root / "spark-warehouse").exists()
    assert (demo.root / "warehouse" / "spark-catalog").is_dir()


def test_the_key_id_is_stored_with_the_run_and_on_the_events_table(demo):
    from deltalake import DeltaTable

    warehouse = demo.root / "warehouse"
    assert DeltaTable(str(warehouse / "events")).metadata().configuration[KEY_ID_PROPERTY] == demo.key.key_id
    runs = DeltaTable(str(warehouse / "pipeline_runs")).to_pyarrow_table(columns=["stage", "details"]).to_pylist()
    ingest = [json.loads(r["details"]) for r in runs if r["stage"] == "ingest"]
    assert ingest and {d["key_id"] for d in ingest} == {demo.key.key_id}
    assert re.fullmatch(r"[0-9a-f]{12}", demo.key.key_id) and demo.key.key_id not in PLANTED_KEY


def test_ingest_refuses_another_key_in_one_line_and_writes_nothing(spark, demo):
    settings = demo_settings(demo.root)
    tables = Tables(spark, settings.storage)
    versions = {t: tables.delta(t).history(1).first()["version"] for t in ("events", "events_quarantine", "items")}
    other = load_key(settings.privacy, {"USERLENS_HMAC_KEY": "another-key-0123456789abcdef"})
    with pytest.raises(
        SecretError,
        match=rf"^the events in .* were pseudonymized with key id {demo.key.key_id}, but "
        rf"the key in USERLENS_HMAC_KEY has key id {other.key_id}: .*"
        r'docs/privacy\.md, "Rotating the key" describes$',
    ) as err:
        run_ingest(spark, settings, other, StageRun("ingest", "wrong-key"))
    assert "\n" not in str(err.value)
    assert {t: tables.delta(t).history(1).first()["version"] for t in versions} == versions
    # (the same key is accepted: the next test's last ingest)


def test_a_warehouse_from_before_the_key_id_property_is_checked_against_its_ingest_runs(spark, demo, tmp_path):
    shutil.copytree(demo.root / "warehouse", tmp_path / "warehouse")
    settings = demo_settings(tmp_path, demo.root / "raw")
    tables = Tables(spark, settings.storage)
    tables.set_properties("events", {KEY_ID_PROPERTY: None})
    assert KEY_ID_PROPERTY not in tables.properties("events")
    other = load_key(settings.privacy, {"USERLENS_HMAC_KEY": "another-key-0123456789abcdef"})
    with pytest.raises(SecretError, match=rf"key id {demo.key.key_id}, but"):
        run_ingest(spark, settings, other, StageRun("ingest", "wrong-key"))
    run_ingest(spark, settings, demo.key, StageRun("ingest", "same-key"))  # the right key: accepted,
    assert tables.properties("events")[KEY_ID_PROPERTY] == demo.key.key_id  # and the property is set again


def test_the_nightly_ran_retention_and_privacy_check_last_and_both_passed(demo):
    from deltalake import DeltaTable

    runs = DeltaTable(str(demo.root / "warehouse" / "pipeline_runs")).to_pyarrow_table().to_pylist()
    by_stage = {r["stage"]: r for r in runs}
    assert by_stage["quarantine_retention"]["status"] == "succeeded"
    assert json.loads(by_stage["quarantine_retention"]["details"])["deleted"] == 0  # 14 days < 30
    check = by_stage["privacy_check"]
    assert check["status"] == "succeeded"
    assert max(r["started_at"] for r in runs) == check["started_at"]  # the last stage
    details = json.loads(check["details"])
    assert details["result"] == "pass" and details["raw_ids_searched"] == len(planted_secrets(demo.root)["raw ids"])
    assert details["raw_ids_skipped"] == 0
    assert set(details["tables"]) >= {
        "events",
        "events_quarantine",
        "items",
        "user_texts",
        "user_embeddings",
        "user_scores",
        "segments",
        "user_profiles",
        "pipeline_runs",
    }
    assert details["tables"]["events_quarantine"]["rows"] > 0 and details["tables"]["events"]["rows"] > 1000
    table = demo.output[re.search(r"^table\s+rows\s+raw-id hits\s+email", demo.output, re.M).start() :]
    for name in ("events", "events_quarantine", "items", "user_texts", "user_profiles", "pipeline_runs"):
        assert re.search(rf"^{name}\s+[\d,]+\s+0\s+0\s+0\s+0\s+0\s+0\s+pass$", table, re.M), name
    assert all(re.search(rf"^{name}\s", table, re.M) for name in TABLES)  # every table has its row
    assert re.search(r"^privacy-check: pass \(\d+ tables, every row; \d+ raw user ids searched\)$", table, re.M)
    assert details["scope"] == "full" and "no passing check" in details["why"]  # the first check of a warehouse
    assert set(details["versions"]) == set(details["tables"])  # what the next check starts from


def plant(spark, demo, tmp_path, table: str, column: str, value: str):
    """A copy of the demo warehouse with ``value`` written into one row's ``column`` of ``table``."""
    shutil.copytree(demo.root / "warehouse", tmp_path / "warehouse")
    settings = demo_settings(tmp_path, demo.root / "raw")
    tables = Tables(spark, settings.storage)
    first = tables.read(table).select(F.min("user_key" if table != "items" else "item_id")).first()[0]
    key_column = "user_key" if table != "items" else "item_id"
    tables.delta(table).update(F.col(key_column) == F.lit(first), {column: F.lit(value)})
    return settings


def test_privacy_check_fails_naming_table_and_column_after_a_raw_id_is_planted(
    spark, demo, tmp_path, capsys, monkeypatch
):
    raw_id = sorted(planted_secrets(demo.root)["raw ids"])[7]
    settings = plant(spark, demo, tmp_path, "items", "title", f"Gift card for {raw_id}, thanks!")

    # the command (`userlens privacy-check --full`, in this process on the shared session; the email test
    # below runs the function): the table on stdout, exit code 1, one line on stderr naming table and column
    argv = ["privacy-check", "--full"]
    for item in [*SPARK_OVERRIDES, *demo_paths(tmp_path), f"source.path={demo.root / 'raw'}", *DEMO]:
        argv += ["--set", item]
    monkeypatch.setenv("USERLENS_HMAC_KEY", PLANTED_KEY)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = cli_main(argv)  # its logging setup replaces the root handlers: put them back afterwards
    finally:
        root.handlers[:], root.level = handlers, level
    done = capsys.readouterr()
    assert code == 1, done.err[-2000:]
    assert re.search(r"^items\s+[\d,]+\s+1\s+0\s+0\s+0\s+0\s+0\s+FAIL$", done.out, re.M), done.out
    assert re.search(r"^events\s+[\d,]+\s+0\s+0\s+0\s+0\s+0\s+0\s+pass$", done.out, re.M), done.out
    assert "FAIL items.title: 1 raw user id(s)" in done.out
    assert "scanned: every row: full scan asked for" in done.out  # --full
    assert done.err.strip().splitlines()[-1] == "userlens: error: privacy-check failed: items.title: 1 raw user id(s)"
    assert raw_id not in done.out + done.err
    failed = Tables(spark, settings.storage).read("pipeline_runs").where("status = 'failed'").collect()
    assert [r["stage"] for r in failed] == ["privacy_check"]
    assert (
        json.loads(failed[0]["details"])["error"]
        == "PrivacyCheckFailed: privacy-check failed: items.title: 1 raw user id(s)"
    )


def test_privacy_check_fails_naming_table_and_column_after_an_email_is_planted(spark, demo, tmp_path):
    settings = plant(spark, demo, tmp_path, "user_texts", "text", "3 events. reach me: jane.roe@example.org")
    with pytest.raises(PrivacyCheckFailed, match=r"^privacy-check failed: user_texts\.text: 1 email$") as err:
        run_privacy_check(spark, settings, StageRun("privacy_check", "r"))
    table = format_table(err.value.result)
    assert re.search(r"^user_texts\s+[\d,]+\s+0\s+1\s+0\s+0\s+0\s+0\s+FAIL$", table, re.M), table
    assert re.search(r"^items\s+[\d,]+\s+0\s+0\s+0\s+0\s+0\s+0\s+pass$", table, re.M), table
    assert "FAIL user_texts.text: 1 email" in table and "jane.roe@example.org" not in table
    # found by an incremental check (the demo's check passed; the UPDATE rewrote user_texts' file since), though
    # the planted text kept its row's text_hash: only a text equal to a checked one is skipped
    assert not err.value.result.scope.full
    texts = next(t for t in err.value.result.tables if t.table == "user_texts")
    assert texts.scanned.startswith("new since v") and texts.scanned.endswith("skipped") and texts.rows > 0


def test_the_privacy_check_notebook_prints_the_table_then_fails_in_one_line(spark, demo, tmp_path, capsys):
    """notebooks/privacy_check.py on a warehouse with a planted email, with only dbutils faked: the pass/fail
    table is printed, then the task fails with the one-line error naming table and column."""
    import logging

    from test_databricks import run_notebook

    plant(spark, demo, tmp_path, "user_texts", "text", "3 events. reach me: jane.roe@example.org")
    overrides = [*SPARK_OVERRIDES, *demo_paths(tmp_path), f"source.path={demo.root / 'raw'}", *DEMO]
    logger = logging.getLogger("userlens")
    handlers, level = list(logger.handlers), logger.level  # the notebook's first cell adds a handler
    try:
        with pytest.raises(PrivacyCheckFailed, match=r"^privacy-check failed: user_texts\.text: 1 email$"):
            run_notebook("privacy_check", {"conf": "local.yaml", "set": "; ".join(overrides)})
    finally:
        logger.handlers[:], logger.level = handlers, level
    printed = capsys.readouterr().out
    assert re.search(r"^user_texts\s+[\d,]+\s+0\s+1\s+0\s+0\s+0\s+0\s+FAIL$", printed, re.M), printed
    assert "FAIL user_texts.text: 1 email" in printed and "jane.roe@example.org" not in printed


def test_a_second_check_scans_only_the_rows_added_since_the_passing_one(spark, demo, tmp_path):
    shutil.copytree(demo.root / "warehouse", tmp_path / "warehouse")
    settings = demo_settings(tmp_path, demo.root / "raw")
    tables = Tables(spark, settings.storage)
    scope = plan_scope(tables, settings)
    assert not scope.full and scope.since["events"] == tables.version("events")
    runs = tables.read("pipeline_runs")
    checked_at = runs.where("stage = 'privacy_check'").agg(F.max("started_at")).first()[0]
    since = runs.where(F.col("started_at") >= checked_at).count()  # the check's own row, then other tests' runs
    assert scope.since["pipeline_runs"] <= tables.version("pipeline_runs") - 1

    result = run_privacy_check(spark, settings, StageRun("privacy_check", "again"))
    by_table = {t.table: t for t in result.tables}
    assert result.passed and not result.scope.full
    assert by_table["events"].rows == 0 and by_table["user_texts"].rows == 0  # nothing written since
    assert by_table["pipeline_runs"].rows == since and by_table["pipeline_runs"].scanned.startswith("new since v")
    assert result.ids_searched == len(planted_secrets(demo.root)["raw ids"])  # every raw id, still
    assert re.search(
        r"^privacy-check: pass \(\d+ tables, new rows; \d+ raw user ids searched\)$", format_table(result), re.M
    )

    # a new night of user_texts: a text equal to one already checked is not scanned again; one changed under
    # the same text_hash (written by something else than textualize) is
    texts = tables.read("user_texts")
    newest = texts.agg(F.max("as_of_date")).first()[0]
    night = texts.where(F.col("as_of_date") == newest).withColumn("as_of_date", F.date_add("as_of_date", 1))
    changed = night.agg(F.min("user_key")).first()[0]
    night = night.withColumn(
        "text", F.when(F.col("user_key") == changed, F.concat("text", F.lit(" more"))).otherwise(F.col("text"))
    )
    before = tables.version("user_texts")
    tables.append("user_texts", night)
    rows, scanned = rows_to_check(tables, "user_texts", tables.version("user_texts"), before)
    assert scanned == f"new since v{before}; text equal to one checked on {newest} skipped"
    assert [r["user_key"] for r in rows.where(F.col("text").isNotNull()).collect()] == [changed]
    assert rows.count() == night.count() > 1

    # more events: only the appended file is scanned, and a raw id in it is found
    raw_id = sorted(planted_secrets(demo.root)["raw ids"])[3]
    extra = tables.read("events").limit(5).withColumn("query", F.lit(f"orders of {raw_id}"))
    tables.append("events", extra)
    with pytest.raises(PrivacyCheckFailed, match=r"^privacy-check failed: events\.query: 5 raw user id\(s\)$") as err:
        run_privacy_check(spark, settings, StageRun("privacy_check", "third"))
    events = next(t for t in err.value.result.tables if t.table == "events")
    assert events.rows == 5


def test_a_full_scan_comes_back_every_check_full_every_days(spark, demo):
    settings = demo_settings(demo.root, demo.root / "raw")
    tables = Tables(spark, settings.storage)
    last_full = tables.read("pipeline_runs").where("stage = 'privacy_check'").agg(F.max("started_at")).first()[0]
    assert not plan_scope(tables, settings, today=last_full.date() + dt.timedelta(days=6)).full
    due = plan_scope(tables, settings, today=last_full.date() + dt.timedelta(days=7))
    assert due.full and "privacy.check_full_every_days=7" in due.why
    always = make_settings(demo.root, *DEMO, f"source.path={demo.root / 'raw'}", "privacy.check_full_every_days=0")
    assert plan_scope(Tables(spark, always.storage), always).full
    assert plan_scope(tables, settings, full=True).why == "full scan asked for"
    # a version that cannot be read back (a newer one than the table's): every row
    version = tables.version("items")
    rows, scanned = rows_to_check(tables, "items", version, version + 3)
    assert scanned == "all" and rows.count() == tables.read("items").count()


# --------------------------------------------------------------------------- DP in user_profiles


def test_user_profiles_carry_the_dp_guarantee_of_their_model_and_the_report_shows_it(demo):
    from deltalake import DeltaTable

    props = DeltaTable(str(demo.root / "warehouse" / "user_profiles")).metadata().configuration
    version = props[MODEL_VERSION_PROPERTY]
    dp = json.loads((demo.root / "models" / version / "metrics.json").read_text())["training"]["dp"]
    assert props[DP_PROPERTY] == "dp-sgd"
    assert props[DP_EPSILON_PROPERTY] == f"{dp['epsilon']:.4f}" and props[DP_DELTA_PROPERTY] == f"{dp['delta']:g}"
    assert 0 < float(props[DP_EPSILON_PROPERTY]) <= 8.0 * 1.05  # train.dp.target_epsilon
    metrics = json.loads((demo.root / "models" / version / "metrics.json").read_text())
    assert dp["unit"] == "user" and dp["noise_multiplier"] > 0 and dp["accountant"] == "rdp"
    # no head taken from the baseline, which is fitted without noise
    assert metrics["training"]["baseline_fallback"] == {}  # no fallback head under DP-SGD
    assert dp["delta"] < 1.0 / metrics["data"]["splits"]["train"]["users"]  # user-level: delta below 1/n
    train_run = next(
        r
        for r in DeltaTable(str(demo.root / "warehouse" / "pipeline_runs")).to_pyarrow_table().to_pylist()
        if r["stage"] == "train"
    )
    assert json.loads(train_run["details"])["dp"] == dp  # what the run recorded is what the artifact holds
    assert set(delta_rows(demo.root / "warehouse" / "user_profiles", "model_version")) == {version}
    report = next((demo.root / "reports").glob("*.html")).read_text(encoding="utf-8")
    assert (
        f"<code>user_profiles</code> hold scores of model <code>{version}</code>, trained with DP-SGD: "
        f"&epsilon; = {props[DP_EPSILON_PROPERTY]}, &delta; = {props[DP_DELTA_PROPERTY]}"
    ) in report


def test_a_second_profile_run_commits_nothing(spark, demo, tmp_path):
    shutil.copytree(demo.root / "warehouse", tmp_path / "warehouse")
    settings = make_settings(
        tmp_path, *DEMO, f"source.path={demo.root / 'raw'}", f"storage.models={demo.root / 'models'}"
    )
    tables = Tables(spark, settings.storage)
    before = tables.delta("user_profiles").history(1).first()["version"]
    as_of = tables.read("user_profiles").agg(F.max("as_of_date")).first()[0]
    result = run_profile(spark, settings, StageRun("profile", "again"), as_of)
    assert result.inserted == result.updated == 0
    assert tables.delta("user_profiles").history(1).first()["version"] == before


def test_model_properties_take_the_weakest_guarantee():
    dp = {"epsilon": 2.5, "delta": 1e-3}
    assert model_properties({}) == dict.fromkeys(
        [MODEL_VERSION_PROPERTY, DP_PROPERTY, DP_EPSILON_PROPERTY, DP_DELTA_PROPERTY]
    )
    assert model_properties({"v2": {"epsilon": 7.123456, "delta": 1e-4}, "v1": dp}) == {
        MODEL_VERSION_PROPERTY: "v1,v2",
        DP_PROPERTY: "dp-sgd",
        DP_EPSILON_PROPERTY: "7.1235",
        DP_DELTA_PROPERTY: "0.001",
    }
    assert model_properties({"v1": dp, "v2": {}})[DP_PROPERTY] == "none"
    assert model_properties({"v1": dp, "v2": {}})[DP_EPSILON_PROPERTY] is None
    assert model_properties({"v1": dp, "v2": None})[DP_PROPERTY] == "unknown"


# --------------------------------------------------------------------------- the scanner's transforms


def test_raw_ids_are_counted_as_whole_tokens_in_strings_and_arrays(spark):
    rows = [
        ("u1234 and u1234.", ["x", "(u1234)"], '{"user_id":"u1234"}'),
        ("u12345 xu1234 u1234-b u1234.5 u1234@mail.com", ["u12345"], None),
        ("ask user 77 please", None, "ab ab ab"),
        (None, ["user 7"], "user 778"),
    ]
    df = spark.createDataFrame(rows, "text string, items array<string>, raw string")
    ids = raw_id_table(
        spark.createDataFrame([("u1234",), (" u1234 ",), ("user 77",), ("ab",), ("",), (None,)], "raw_id string"),
        min_chars=3,
    )
    table = {r["raw_id"]: (r["anchor"], r["single"], r["searched"]) for r in ids.collect()}
    assert table == {"u1234": ("u1234", True, True), "user 77": ("user", False, True), "ab": ("ab", True, False)}
    hits = {r["column"]: r["hits"] for r in raw_id_hits(df, ids.where("searched")).collect()}
    # "user 7" and "user 778" do not hold "user 77" as whole tokens; "ab" is too short to be searched
    assert hits == {"text": 3, "items": 1, "raw": 1}


def test_pii_is_what_a_second_scrub_adds(spark):
    stored = [
        "<email> wrote",
        "call <phone>, card <card>",
        "order #A-10293847 on 2026-10-03 for $1,299.99",
        "v2.10.3 firmware",
        None,
    ]
    leaked = [
        "mail jane.doe@mail.example.com or +1 415-555-0134",
        "card 4111 1111 1111 1111 ip 10.0.0.1",
        "iban DE89 3704 0044 0532 0130 00 and 2001:db8::8a2e:370:7334",
    ]
    # user_scores.explanations: an array of structs whose string fields are scanned too
    df = spark.createDataFrame(
        [(t, [t] if t else None, [(t, "purchase", 0.1)] if t else None) for t in [*stored, *leaked]],
        "text string, tags array<string>, why array<struct<text: string, task: string, weight: double>>",
    )
    assert [r[0] for r in df.select(scrub_pii(F.col("text"))).collect()][:4] == stored[:4]  # already clean
    counts = pii_counts(df).first().asDict()
    assert counts["rows"] == 8
    expected = {"email": 1, "phone": 1, "card": 1, "ip": 2, "iban": 1}
    assert {k.split("|")[1]: v for k, v in counts.items() if k.startswith("text|")} == expected
    assert {k.split("|")[1]: v for k, v in counts.items() if k.startswith("tags|")} == expected
    assert {k.split("|")[1]: v for k, v in counts.items() if k.startswith("why|")} == expected
