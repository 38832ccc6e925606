"""Config layering, ${ENV} expansion and one-line errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from userlens.cli import main
from userlens.config import load_settings
from userlens.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_layering_base_then_files_then_set(tmp_path):
    one = write(tmp_path / "one.yaml", "storage:\n  warehouse: /a\nspark:\n  shuffle_partitions: 3\n")
    two = write(tmp_path / "two.yaml", "storage:\n  warehouse: /b\n")
    s = load_settings([one, two], ["spark.shuffle_partitions=5", "spark.conf.spark.sql.ansi.enabled=false"])
    assert s.storage.warehouse == "/b"
    assert s.spark.shuffle_partitions == 5
    # base.yaml's map entries survive; a dotted --set under spark.conf is one key
    assert s.spark.conf == {"spark.sql.session.timeZone": "UTC", "spark.sql.ansi.enabled": "false"}
    assert s.embed.model == "builtin:minilm"


def test_default_is_local_yaml():
    s = load_settings()
    assert s.env == "local" and s.spark.master == "local[*]" and s.storage.warehouse == "./warehouse"


def test_unknown_key_names_file_and_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "storage:\n  wharehouse: /x\n")
    with pytest.raises(ConfigError) as err:
        load_settings([bad])
    assert str(err.value) == f"{bad}: storage.wharehouse: unknown key"


def test_bad_value_names_file_and_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "spark:\n  shuffle_partitions: lots\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: spark.shuffle_partitions: .*integer.*'lots'"):
        load_settings([bad])
    with pytest.raises(ConfigError, match=r"^--set: source.format: .*'xml'"):
        load_settings(None, ["source.format=xml"])


def test_env_expansion(tmp_path):
    conf = write(tmp_path / "c.yaml", "storage:\n  warehouse: ${WH_ROOT}/wh\n  models: ${MODELS:-/default/models}\n")
    s = load_settings([conf], env={"WH_ROOT": "/data"})
    assert s.storage.warehouse == "/data/wh" and s.storage.models == "/default/models"
    with pytest.raises(ConfigError, match=r"c.yaml: storage.warehouse: environment variable \$\{WH_ROOT\} is not set"):
        load_settings([conf], env={})


def test_yaml_syntax_error_names_file(tmp_path):
    bad = write(tmp_path / "broken.yaml", "storage: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+"):
        load_settings([bad])


def test_missing_conf_file():
    with pytest.raises(ConfigError, match="no-such.yaml: config file not found"):
        load_settings(["no-such.yaml"])


def test_cli_config_error_exits_2_before_spark(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["ingest", "--set", "storage.warehous=/x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["userlens: error: --set: storage.warehous: unknown key"]
    assert not (tmp_path / "warehouse").exists()


def test_cluster_conf_requires_real_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("USERLENS_HMAC_KEY", raising=False)
    monkeypatch.setenv("USERLENS_WAREHOUSE", str(tmp_path / "wh"))
    monkeypatch.setenv("USERLENS_SOURCE", str(tmp_path / "raw"))
    for name, line in (
        ("events", '{"user_id": "u1", "ts": "2026-10-01T00:00:00Z", "event_type": "view"}'),
        ("items", '{"item_id": "i1"}'),
    ):  # a source that passes the pre-flight
        (tmp_path / "raw" / name).mkdir(parents=True)
        (tmp_path / "raw" / name / "part-0.json").write_text(line + "\n", encoding="utf-8")
    code = main(["ingest", "--conf", "conf/cluster.yaml"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "USERLENS_HMAC_KEY is not set" in err[0]
    assert not (tmp_path / "wh").exists()
