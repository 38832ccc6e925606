"""Bringing one's own data: a wrong mapping fails before Spark, a run that quarantines most of its input
fails, no raw id reaches any table whatever the mapping, epoch-ms times survive the quarantine, unreadable
files are named, privacy-check never crashes. Real Spark, real Delta; tiny files written here."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from conftest import TEST_KEY, make_settings
from userlens.cli import main
from userlens.config import IngestSettings
from userlens.errors import ConfigError, SourceError
from userlens.privacy import load_key, pseudonymize
from userlens.runs import StageRun
from userlens.sources.preflight import check_mapping, check_source, local_columns
from userlens.sources.redact import redact_raw_record, without_epoch_values
from userlens.stages.ingest import check_quarantine_limits, run_ingest

USERS = [f"cust-{i}" for i in range(12)]
T0 = 1_730_390_400_000  # epoch milliseconds
KEY = load_key(make_settings(Path("/tmp")).privacy, {"USERLENS_HMAC_KEY": TEST_KEY})
# the mapping of a CSV export with its own column names (the drill); `user_id` is set per test
MAPPING = (
    "source.mapping={event_id: null, user_id: %s, event_time: ts_ms, event_type: action, item_id: sku, "
    "category: cat, price: amount, quantity: null, query: null, text: null}"
)
CSV_SOURCE = [
    "source.format=csv",
    "source.timestamp_format=epoch_ms",
    "source.event_type_map={pv: view, clk: click, buy: purchase}",
    "source.items_mapping={item_id: item_id, title: title, category: null, brand: null, price: null, "
    "description: null}",
]


def write_csv_source(root: Path, n: int = 60, empty_ids: bool = False) -> list[list[str]]:
    """uid, user (empty: a column that exists but holds nothing), ts_ms, action, sku, cat, amount."""
    rows = [
        [
            USERS[i % len(USERS)],
            "",
            str(T0 + i * 60_000),
            ("pv", "clk", "buy")[i % 3],
            f"sku-{i % 7}",
            "ab"[i % 2],
            f"{1 + i % 9}.50",
        ]
        for i in range(n)
    ]
    if empty_ids:
        for row in rows:
            row[0] = ""
            row[1] = ""
    (root / "events").mkdir(parents=True)
    with (root / "events" / "part-0.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["uid", "user", "ts_ms", "action", "sku", "cat", "amount"])
        writer.writerows(rows)
    (root / "items").mkdir()
    (root / "items" / "items.csv").write_text(
        "item_id,title\n" + "".join(f"sku-{i},Thing {i}\n" for i in range(7)), encoding="utf-8"
    )
    return rows


def drill_args(tmp_path: Path, user_column: str, *extra: str) -> list[str]:
    sets = [
        "spark.master=local[2]",
        "spark.ui=false",
        "spark.shuffle_partitions=2",
        "spark.log_level=ERROR",
        f"storage.warehouse={tmp_path / 'wh'}",
        f"storage.models={tmp_path / 'models'}",
        f"source.path={tmp_path / 'raw'}",
        *CSV_SOURCE,
        MAPPING % user_column,
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def warehouse_strings(warehouse: Path) -> list[str]:
    """Every string value of every Delta table under ``warehouse``, read with the deltalake package."""
    from deltalake import DeltaTable

    values: list[str] = []
    for log_dir in warehouse.glob("*/_delta_log"):
        table = DeltaTable(str(log_dir.parent)).to_pyarrow_table()
        for name, column in zip(table.column_names, table.columns):
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                values += [v for v in column.to_pylist() if v is not None]
            elif pa.types.is_list(column.type) and pa.types.is_string(column.type.value_type):
                values += [v for vs in column.to_pylist() if vs for v in vs if v is not None]
    return values


def one_line_errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("userlens: ")]


# --------------------------------------------------------------------------
# before Spark: missing paths and a mapping typo
# --------------------------------------------------------------------------
NO_SPARK = textwrap.dedent("""
    import contextlib, io, json, sys, time
    from userlens.cli import main
    out = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        out.append({"argv": argv[0], "code": code, "seconds": time.perf_counter() - started,
                    "errors": [l for l in err.getvalue().splitlines() if l.startswith("userlens: ")]})
    spark_started = "pyspark" in sys.modules and __import__("pyspark").SparkContext._active_spark_context is not None
    print(json.dumps({"runs": out, "spark_started": spark_started}))
""")


def run_without_spark(commands: list[list[str]]) -> dict:
    """Run CLI commands in one fresh interpreter; their codes, one-line errors, and whether Spark started."""
    done = subprocess.run(
        [sys.executable, "-c", NO_SPARK, json.dumps(commands)],
        capture_output=True,
        text=True,
        check=True,
        # the tree under test (not whichever userlens the interpreter has installed), and no Spark settings
        env={
            "USERLENS_HMAC_KEY": TEST_KEY,
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path(__file__).parents[1] / "lib"),
        },
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_mapping_typo_fails_before_spark_naming_the_column_and_writes_nothing(tmp_path):
    write_csv_source(tmp_path / "raw")
    result = run_without_spark(
        [
            ["ingest", *drill_args(tmp_path, "userid")],
            ["nightly", *drill_args(tmp_path, "userid")],
            ["check-source", *drill_args(tmp_path, "userid")],
        ]
    )
    for run in result["runs"]:
        assert run["code"] == 2, run
        assert run["errors"] == [
            "userlens: error: source.mapping.user_id: column 'userid' not in the source "
            "(columns: uid, user, ts_ms, action, sku, cat, amount); did you mean 'user'?"
        ], run
    assert not result["spark_started"]
    assert not (tmp_path / "wh").exists()


def test_missing_paths_fail_before_spark_for_every_command(tmp_path):
    missing = tmp_path / "nowhere"
    base = ["--set", f"storage.warehouse={missing / 'wh'}", "--set", f"source.path={missing / 'raw'}"]
    commands = {
        name: [name, *base]
        for name in (
            "ingest",
            "nightly",
            "check-source",
            "privacy-check",
            "textualize",
            "embed",
            "train",
            "score",
            "profile",
            "report",
        )
    }
    commands["forget"] = ["forget", "--user-id", "cust-1", *base]
    commands["evaluate"] = [
        "evaluate",
        "--dataset",
        "movielens-100k",
        "--path",
        str(missing / "ml"),
        "--protocol",
        "loo-full",
    ]
    result = run_without_spark(list(commands.values()))
    wh, events = f"{missing / 'wh'} does not exist", f"source.path: {missing / 'raw' / 'events'} does not exist"
    expected = {
        "ingest": events,
        "nightly": events,
        "check-source": events,
        "privacy-check": f"storage.warehouse: {wh}",
        "evaluate": f"--path: {missing / 'ml'} does not exist",
    }
    for run in result["runs"]:
        name = run["argv"]
        assert run["code"] == 2, run
        assert len(run["errors"]) == 1 and run["errors"][0].startswith(
            f"userlens: error: {expected.get(name, 'storage.warehouse: ' + wh)}"
        ), run
    assert len(result["runs"]) == len(commands)
    assert not result["spark_started"]


def test_local_columns_of_each_format(tmp_path):
    (tmp_path / "csv" / "d=1").mkdir(parents=True)
    (tmp_path / "csv" / "d=1" / "a.csv.gz").write_bytes(gzip.compress(b"uid,ts\nu1,1\n"))
    (tmp_path / "csv" / "_SUCCESS").write_text("")
    assert local_columns(str(tmp_path / "csv"), "csv").columns == ("uid", "ts", "d")
    assert local_columns(str(tmp_path / "csv"), "csv", csv_header=False).columns == ("_c0", "_c1", "d")

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"customer": ["u1"], "when": [1]}), tmp_path / "pq" / "part-0.parquet")
    assert local_columns(f"file://{tmp_path / 'pq'}", "parquet").columns == ("customer", "when")

    from deltalake import write_deltalake

    write_deltalake(str(tmp_path / "delta"), pa.table({"member": ["u1"], "at": [1]}))
    found = local_columns(str(tmp_path / "delta"), "delta")
    assert found.columns == ("member", "at") and found.exhaustive

    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "a.json").write_text('{"u": 1, "t": 2}\nnot json\n{"u": 3, "q": "x"}\n')
    found = local_columns(str(tmp_path / "json"), "json")
    assert (found.columns, found.exhaustive, found.sampled) == (("u", "t", "q"), False, 3)
    assert local_columns("s3a://bucket/events", "json") is None  # left to Spark


def test_json_sample_reads_the_newest_files_too(tmp_path):
    """A field the first days lack (reviews of earlier purchases) is found in the newest files."""
    for day in range(1, 13):
        folder = tmp_path / "e" / f"event_date=2026-10-{day:02d}"
        folder.mkdir(parents=True)
        review = ', "review": "ok"' if day == 12 else ""
        (folder / "part-0.json").write_text(f'{{"uid": "u{day}", "t": "2026-10-{day:02d}"{review}}}\n' * 3)
    found = local_columns(str(tmp_path / "e"), "json")
    assert "review" in found.columns and found.sampled == 8 * 3 + 4 * 3
    assert found.describe_sample() == "36 lines sampled from the oldest and the newest files"


def test_json_sample_errors_for_required_fields_and_warns_for_optional_ones(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.json").write_text('{"uid": "u1", "t": "2026-10-01", "k": "view"}\n')
    found = local_columns(str(tmp_path / "e"), "json")
    mapping = {"user_id": "uid", "event_time": "t", "event_type": "k", "text": "review"}
    warnings = check_mapping(found, mapping, "source.mapping", ("user_id", "event_time", "event_type"))
    assert warnings == [
        f"source.mapping: not seen in the first 1 lines of {tmp_path / 'e'}: text ('review'); "
        "rows without them get no value there"
    ]
    with pytest.raises(
        ConfigError,
        match=r"^source.mapping.event_type: column 'kind' not in the first 1 lines of "
        r"the source \(columns: uid, t, k\)$",
    ):
        check_mapping(found, {**mapping, "event_type": "kind"}, "source.mapping", ("event_type",))
    (tmp_path / "e" / "a.json").write_text("user,time\nu1,2026\n")
    with pytest.raises(ConfigError, match=r"columns: none; its first line is 'user,time'"):
        check_mapping(local_columns(str(tmp_path / "e"), "json"), mapping, "source.mapping", ("user_id",))


# --------------------------------------------------------------------------
# through Spark: the quarantine limit, what quarantined rows keep, privacy-check
# --------------------------------------------------------------------------
def test_values_all_empty_fail_the_run_keep_the_quarantine_and_leak_no_raw_id(spark, tmp_path, capsys):
    rows = write_csv_source(tmp_path / "raw")
    # `user` exists but is empty in every row; the ids sit in `uid`, which the mapping does not name
    code = main(["ingest", *drill_args(tmp_path, "user")])
    errors = one_line_errors(capsys.readouterr().err)
    assert code == 1 and len(errors) == 1
    assert errors[0].startswith(
        "userlens: error: ingest: 60 of 60 rows (100.0%) were quarantined, above "
        "ingest.max_quarantine_fraction=0.5 (missing_user_id 60); nothing was written to "
        "events, the rows are in events_quarantine"
    )
    from userlens.tables import Tables

    settings = make_settings(tmp_path, f"storage.warehouse={tmp_path / 'wh'}")
    tables = Tables(spark, settings.storage)
    assert not tables.exists("events") or tables.read("events").count() == 0
    run = tables.read("pipeline_runs").where("stage = 'ingest'").first()
    assert run.status == "failed" and json.loads(run.details)["reasons"] == {"missing_user_id": 60}
    quarantine = tables.read("events_quarantine").where("source = 'events'")
    assert quarantine.count() == 60

    values = "\n".join(warehouse_strings(tmp_path / "wh"))
    assert values and not [u for u in USERS if u in values]
    # an unmapped value becomes the user_key it would have had: joinable once the mapping is fixed
    keys = {
        r[0]
        for r in spark.createDataFrame([(u,) for u in USERS], "u string")
        .select(pseudonymize(F.col("u"), load_key(settings.privacy)))
        .collect()
    }
    raws = [json.loads(r.raw) for r in quarantine.collect()]
    assert {r["uid"] for r in raws} == keys
    # epoch-ms times are kept as they were (not masked as card numbers), and so are mapped fields
    assert sorted(r["ts_ms"] for r in raws) == sorted(row[2] for row in rows)
    assert {r["action"] for r in raws} == {"pv", "clk", "buy"}

    # privacy-check with that mapping reads no raw id, and says so in one line (no crash)
    code = main(["privacy-check", *drill_args(tmp_path, "user")])
    errors = one_line_errors(capsys.readouterr().err)
    assert code == 1 and errors == [
        f"userlens: error: privacy-check: 0 raw ids read from the source "
        f"({tmp_path / 'raw' / 'events'}): check source.mapping.user_id"
    ]
    # with the typo, before Spark; with the right mapping, the warehouse passes: no raw id anywhere
    code = main(["privacy-check", *drill_args(tmp_path, "userid")])
    assert code == 2 and "column 'userid' not in the source" in one_line_errors(capsys.readouterr().err)[0]
    code = main(["privacy-check", *drill_args(tmp_path, "uid")])
    assert code == 0 and "privacy-check: pass" in capsys.readouterr().out


def test_privacy_check_through_spark_with_a_wrong_mapping_is_one_line(spark, tmp_path):
    from userlens.config import load_settings
    from userlens.stages.privacy_check import run_privacy_check

    write_csv_source(tmp_path / "raw")
    sets = drill_args(tmp_path, "userid")[1::2]
    settings = load_settings(None, sets)
    with pytest.raises(ConfigError, match="^source.mapping.user_id: column 'userid' not in the source"):
        run_privacy_check(spark, settings, StageRun("privacy_check", "r1"), full=True)


def test_a_bad_row_keeps_its_time_and_the_good_rows_land(spark, tmp_path):
    rows = write_csv_source(tmp_path / "raw")
    with (tmp_path / "raw" / "events" / "part-0.csv").open("a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(["cust-1", "", str(T0 + 123), "hover", "sku-1", "a", "1.00"])
    settings = make_settings(tmp_path, *CSV_SOURCE, MAPPING % "uid")
    result = run_ingest(spark, settings, KEY, StageRun("ingest", "r1"))
    assert (result.rows_in, result.rows_out, result.reasons) == (len(rows) + 1, len(rows), {"unknown_event_type": 1})
    from userlens.tables import Tables

    bad = Tables(spark, settings.storage).read("events_quarantine").where("source = 'events'").first()
    assert json.loads(bad.raw) == {
        "uid": bad.user_key,
        "ts_ms": str(T0 + 123),
        "action": "hover",
        "sku": "sku-1",
        "cat": "a",
        "amount": "1.00",
    }


def test_redacted_records(spark):
    lines = [
        '{"event_id":"x1","user_id":"carol-003","ts":"2026-10-01T09:00:00Z","event_ty',  # truncated
        '{"user_id":"bob","review_text":"mail me at bob@example.com","stars":2,"ok":true,"tags":["carol-003"],'
        '"meta":{"email":"carol@example.com","n":3}}',
        "not json carol-003",
        '{"customer": 1730390400123, "sent": 1730390400123, "when": "2026-10-01", "note": "carol-003"}',
    ]
    roles = {"user_id": "user_id", "ts": "event_time", "review_text": "text"}
    df = spark.createDataFrame([(line,) for line in lines], "raw string")
    got = [json.loads(r[0]) for r in df.select(redact_raw_record(F.col("raw"), roles, KEY)).collect()]
    key_of = {
        r[0]: r[1]
        for r in spark.createDataFrame(
            [(v,) for v in ("carol-003", "bob", "x1", "carol@example.com", "1730390400123")], "v string"
        )
        .select("v", pseudonymize(F.col("v"), KEY))
        .collect()
    }
    assert got[0] == {"event_id": key_of["x1"], "user_id": key_of["carol-003"], "ts": "2026-10-01T09:00:00Z"}
    assert got[1] == {
        "user_id": key_of["bob"],
        "review_text": "mail me at <email>",
        "stars": 2,
        "ok": True,
        "tags": "<nested>",
        "meta": "<nested>",
        "email": key_of["carol@example.com"],
        "n": 3,
    }
    assert got[2] == {}
    # an id-like name is never kept, an epoch time under another name is, and free text is not
    assert got[3] == {
        "customer": key_of["1730390400123"],
        "sent": 1730390400123,
        "when": "2026-10-01",
        "note": key_of["carol-003"],
    }
    # what privacy-check scans of a redacted record: whole epoch values out, a card inside a text stays
    record = '{"ts":1730390400123,"t":"card 4111111111111111 1730390400","s":"1730390400"}'
    scanned = spark.createDataFrame([(record,)], "raw string").select(without_epoch_values(F.col("raw"))).first()[0]
    assert scanned == '{"ts":<time>,"t":"card 4111111111111111 1730390400","s":"<time>"}'


def test_quarantine_limits():
    strict = IngestSettings(max_reason_fraction={"bad_timestamp": 0.05})
    assert check_quarantine_limits(strict, 100, {"bad_timestamp": 5}) is None
    assert check_quarantine_limits(strict, 100, {"bad_timestamp": 6}) == (
        "6 of 100 rows (6.0%) were quarantined as bad_timestamp, above ingest.max_reason_fraction.bad_timestamp=0.05"
    )
    assert check_quarantine_limits(IngestSettings(), 10, {"missing_user_id": 4, "bad_price": 2}).startswith(
        "6 of 10 rows (60.0%) were quarantined, above ingest.max_quarantine_fraction=0.5 (missing_user_id 4, "
        "bad_price 2)"
    )
    assert check_quarantine_limits(IngestSettings(), 0, {}) is None
    with pytest.raises(ValueError, match="unknown quarantine reason 'bad_time'"):
        IngestSettings(max_reason_fraction={"bad_time": 0.1})


def test_an_unreadable_file_is_named_or_skipped_and_recorded(spark, tmp_path):
    events = tmp_path / "raw" / "events" / "event_date=2026-10-01"
    events.mkdir(parents=True)
    lines = [
        json.dumps(
            {
                "event_id": f"e{i}",
                "user_id": USERS[i % 3],
                "ts": "2026-10-01T10:00:00Z",
                "event_type": "view",
                "item_id": "i1",
            }
        )
        for i in range(6)
    ]
    (events / "good.json").write_text("\n".join(lines[:3]) + "\n")
    packed = gzip.compress(("\n".join(lines[3:]) + "\n").encode())
    (events / "bad.json.gz").write_bytes(packed[:20] + b"\0" * 12 + packed[32:])  # a corrupt deflate block
    (tmp_path / "raw" / "items").mkdir()
    (tmp_path / "raw" / "items" / "items.json").write_text('{"item_id": "i1", "title": "T"}\n')
    settings = make_settings(tmp_path)
    check_source(settings)  # the pre-flight reads around a file it cannot open; Spark names it below
    with pytest.raises(
        SourceError,
        match=rf"^cannot read the events file \S*{events / 'bad.json.gz'}: \w+: .+; "
        r"nothing was written \(set ingest.on_unreadable_file=skip",
    ):
        run_ingest(spark, settings, KEY, StageRun("ingest", "r1"))
    assert not (tmp_path / "warehouse" / "events").exists()

    skip = make_settings(tmp_path, "ingest.on_unreadable_file=skip")
    run = StageRun("ingest", "r2")
    result = run_ingest(spark, skip, KEY, run)
    assert (result.rows_in, result.rows_out) == (3, 3)
    assert [Path(f).name for f in result.skipped_files] == ["bad.json.gz"]
    details = result.run_record().details
    assert details["files_skipped"] == 1 and details["skipped_files"][0].endswith("bad.json.gz")


def test_check_source_prints_mapped_pseudonymized_rows(spark, tmp_path, capsys):
    write_csv_source(tmp_path / "raw")
    code = main(["check-source", *drill_args(tmp_path, "uid")])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == f"source: {tmp_path / 'raw' / 'events'} (csv; columns: uid, user, ts_ms, action, sku, cat, amount)"
    assert out[1].startswith("mapping: user_id <- uid, event_time <- ts_ms, event_type <- action")
    assert out[2] == "sample: the first 60 rows: 60 ok"
    assert out[3].split()[:3] == ["user_key", "event_time", "event_type"] and len(out) == 4 + 5
    assert not [u for u in USERS if u in "\n".join(out)]
    assert not (tmp_path / "wh").exists()  # nothing written
