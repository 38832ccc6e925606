"""The command line: one-line errors, exit codes, nothing written on bad input."""

from __future__ import annotations

import re
import subprocess
import sys

from userlens.cli import main


def test_missing_source_path_is_one_line_and_writes_nothing(tmp_path, capsys):
    code = main(
        [
            "ingest",
            "--set",
            "spark.master=local[2]",
            "--set",
            f"storage.warehouse={tmp_path / 'wh'}",
            "--set",
            f"source.path={tmp_path / 'nowhere'}",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("userlens: ")]
    assert code == 2
    assert err == [f"userlens: error: source.path: {tmp_path / 'nowhere' / 'events'} does not exist"]
    assert not (tmp_path / "wh").exists()  # the pre-flight runs before Spark: not even a run row


def test_textualize_without_a_warehouse_or_events_names_the_command_to_run(spark, tmp_path, capsys):
    code = main(["textualize", "--set", f"storage.warehouse={tmp_path / 'wh'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("userlens: ")]
    assert code == 2 and err == [
        f"userlens: error: storage.warehouse: {tmp_path / 'wh'} does not exist: run "
        "`userlens ingest` (or `userlens demo`) first, or point storage.warehouse at a "
        "warehouse"
    ]
    (tmp_path / "wh").mkdir()
    code = main(["textualize", "--set", f"storage.warehouse={tmp_path / 'wh'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("userlens: ")]
    assert code == 1 and err == ["userlens: error: no events table: run `userlens ingest` first"]


def test_help_lists_every_command():
    from userlens.stages import STAGES

    out = subprocess.run([sys.executable, "-m", "userlens.cli", "--help"], capture_output=True, text=True, check=True)
    listed = re.findall(r"^    ([a-z-]+)(?:  |$)", out.stdout, re.MULTILINE)  # a line per command under COMMAND
    expected = {
        "sample",
        "check-source",
        "nightly",
        "demo",
        "evaluate",
        "status",
        "pseudonymize",
        "publish",
        *(s.command for s in STAGES),
    }
    assert set(listed) == expected and len(listed) == len(expected)
    for command in sorted(expected):  # each is a command with its own help, description and example
        done = subprocess.run([sys.executable, "-m", "userlens.cli", command, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: userlens {command}"), command
        assert "example: userlens " + command in done.stdout, command
    from userlens.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    undescribed = [name for name, parser in commands.items() if not (parser.description or "").endswith(".")]
    assert undescribed == []  # each --help says in a sentence what the command does


def test_bad_date_option_exits_2():
    out = subprocess.run(
        [sys.executable, "-m", "userlens.cli", "ingest", "--date", "2026-13-01"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "expected a date YYYY-MM-DD" in out.stderr


def test_pseudonymize_writes_the_keys_ingest_would_and_prints_neither_ids_nor_keys(
    spark, tmp_path, capsys, monkeypatch
):
    import hashlib
    import hmac

    from conftest import TEST_KEY

    ids = ["crm-0001", "  crm-0002 ", "", "crm-0003"]
    source = tmp_path / "crm.csv"
    source.write_text("customer_id,segment\n" + "".join(f"{i},s{n}\n" for n, i in enumerate(ids)), encoding="utf-8")
    out = tmp_path / "keys.parquet"
    monkeypatch.setenv("USERLENS_HMAC_KEY", TEST_KEY)
    code = main(["pseudonymize", "--in", str(source), "--column", "customer_id", "--out", str(out)])
    bad = main(["pseudonymize", "--in", str(source), "--column", "customerid", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0 and bad != 0
    rows = {r["segment"]: r["user_key"] for r in spark.read.parquet(str(out)).collect()}
    expected = {
        f"s{n}": hmac.new(TEST_KEY.encode(), i.strip().encode(), hashlib.sha256).hexdigest() if i.strip() else None
        for n, i in enumerate(ids)
    }
    assert rows == expected
    for secret in [*[i.strip() for i in ids if i.strip()], *[k for k in expected.values() if k]]:
        assert secret not in printed.out and secret not in printed.err
    assert "4 rows, 3 with a user_key" in printed.out
    assert "--column: " in printed.err and "customer_id" in printed.err  # the columns that are there


def test_default_console_shows_each_stage_line_and_each_warning_once_and_quiet_only_warnings(capsys):
    import logging

    from userlens.cli import _setup_logging

    def emit() -> None:
        logging.getLogger("userlens.embedding").info("embed: a detail line")
        logging.getLogger("userlens.runs").info("embed:  succeeded in 1.0 s")
        for _ in range(3):
            logging.getLogger("userlens.privacy").warning("the public development key")

    _setup_logging(verbose=False)
    emit()
    default = capsys.readouterr()
    _setup_logging(verbose=False, quiet=True)
    emit()
    quiet = capsys.readouterr()
    _setup_logging(verbose=True)
    emit()
    verbose = capsys.readouterr()
    _setup_logging(verbose=False)

    assert default.out == quiet.out == verbose.out == ""  # log lines never go to stdout
    assert "a detail line" not in default.err and "succeeded in 1.0 s" in default.err
    assert default.err.count("the public development key") == 1
    assert "succeeded in" not in quiet.err and quiet.err.count("the public development key") == 1
    assert "a detail line" in verbose.err and verbose.err.count("the public development key") == 3


def test_log_format_json_gives_one_parsable_object_per_line(spark, tmp_path, capsys, monkeypatch):
    import json

    source = tmp_path / "crm.csv"
    source.write_text("customer_id\ncrm-1\ncrm-2\n", encoding="utf-8")
    monkeypatch.delenv("USERLENS_HMAC_KEY", raising=False)  # the development key's warning: one line to see
    code = main(
        ["pseudonymize", "--in", str(source), "--column", "customer_id", "--out", str(tmp_path / "k.csv")]
        + ["--log-format", "json", "--set", "spark.log_level=ERROR"]
    )
    printed = capsys.readouterr()
    assert code == 0
    lines = [json.loads(line) for line in printed.err.splitlines()]  # every line parses
    assert lines and all(set(entry) >= {"time", "level", "logger", "message"} for entry in lines)
    assert any(e["level"] == "WARNING" and "development key" in e["message"] for e in lines)
    assert "2 rows" in printed.out  # the result stays on stdout, as text
