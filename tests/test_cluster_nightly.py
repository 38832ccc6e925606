"""`spark-submit jobs/nightly.py` on a real Spark standalone cluster (one master, two one-core workers
on 127.0.0.1), its results against a local-mode run on the same data, and a worker killed while the
embed stage runs.

* The nightly runs every stage on the executors; TorchDistributor(local_mode=False) trains as a barrier
  stage over both executors.
* A local[2] nightly over a copy of the same raw data, with the cluster's model and segment model,
  gives the same users, texts, embeddings, scores, segments and recommendations.
* Drill: `spark-submit jobs/embed.py` into a warehouse without embeddings; one worker and its executor
  are SIGKILLed while the stage runs; Spark reschedules the lost tasks on the other executor and the
  embeddings equal the clean run's.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from cluster import daemon_env, spark_submit_command, standalone_cluster  # noqa: F401 (fixture)
from conftest import (
    FIXED_ALS,
    NO_EXPLAIN,
    NO_TEXT_BASELINE,
    SHORT_TEXTS,
    TEST_KEY,
    make_settings,
)
from userlens.privacy import load_key
from userlens.sample import SampleSpec, generate_sample
from userlens.stages.nightly import run_nightly
from userlens.tables import Tables

REPO = Path(__file__).resolve().parents[1]
SUBMIT_TIMEOUT_S = 900  # a guard against a hung barrier stage; the run takes 3 to 10 minutes on 2 busy cores
USERS, DAYS, START = 150, 14, dt.date(2026, 10, 1)
LAST = START + dt.timedelta(days=DAYS - 1)
# small data: Delta replays its log in 2 partitions, not 50; a lost executor's tasks are retried
SMALL_CONFS = {"spark.databricks.delta.snapshotPartitions": "2", "spark.task.maxFailures": "4"}
# what docs/deploy.md shows; the small-data settings keep the run short
NIGHTLY_ARGS = [
    "--conf",
    "conf/cluster.yaml",
    "--set",
    "spark.shuffle_partitions=2",
    "--set",
    "train.local_mode=false",
    "--set",
    "train.num_processes=2",
    "--set",
    "train.epochs=3",
    "--set",
    "train.min_users=40",
    "--set",
    "train.min_class_users=3",
    "--set",
    "train.batch_size=32",
    "--set",
    "profile.segments=4",
    "--set",
    "privacy.min_segment_size=10",
    "--set",
    "nightly.report=false",
]
COMPARED = {
    "user_texts": ["text_hash"],
    "user_embeddings": ["text_hash"],
    "user_scores": ["model_version", "next_category", "recommended_items"],
    "user_profiles": ["segment_id", "top_categories", "recommended_items", "recency_days", "frequency_30d"],
}


def submit(cluster, job: str, args: list[str], env: dict[str, str], log: Path, during=None) -> tuple[int | str, str]:
    """spark-submit ``job`` from the repository root, output to ``log``; ``during(process, log)`` runs in a
    thread while it does."""
    command = spark_submit_command(cluster.master_url, job, *args, confs=SMALL_CONFS)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
        )
        helper = threading.Thread(target=during, args=(process, log), daemon=True) if during else None
        if helper:
            helper.start()
        try:
            code: int | str = process.wait(SUBMIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = f"nothing: killed after {SUBMIT_TIMEOUT_S}s"
        if helper:
            helper.join(30)
    text = log.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-60:])
    assert code == 0, f"{shlex.join(command)}\nexited {code}; the last lines of its output:\n{tail}"
    return code, text


def rows(tables: Tables, table: str, columns: list[str]) -> dict[str, tuple]:
    df = tables.read(table)
    if "as_of_date" in df.columns:
        df = df.where(F.col("as_of_date") == F.lit(LAST))
    return {r["user_key"]: tuple(r[c] for c in columns) for r in df.select("user_key", *columns).collect()}


def vectors(tables: Tables, table: str, column: str) -> dict[str, np.ndarray]:
    df = tables.read(table)
    return {
        r["user_key"]: np.asarray(r[column] if not isinstance(r[column], (int, float)) else [r[column]], float)
        for r in df.select("user_key", column).collect()
        if r[column] is not None
    }


@pytest.fixture(scope="module")
def clustered(spark, standalone_cluster, tmp_path_factory):  # noqa: F811 (the fixture)
    """The sample, and one `spark-submit jobs/nightly.py` over it on the cluster."""
    root = tmp_path_factory.mktemp("cluster-nightly")
    settings = make_settings(root)
    generate_sample(
        spark, settings.source.path, SampleSpec(users=USERS, days=DAYS, items=120, seed=3, start_date=START)
    )
    env = {
        **daemon_env(),
        "USERLENS_HMAC_KEY": TEST_KEY,
        "USERLENS_WAREHOUSE": settings.storage.warehouse,
        "USERLENS_SOURCE": settings.source.path,
    }
    # the documented command, with the shorter texts of the pipeline tests (a third of the encoder's work)
    # and one ALS fit instead of the grid (test_train checks the tuning)
    # (and no bag-of-words baseline: tests/test_train.py fits it)
    light = [SHORT_TEXTS, FIXED_ALS, NO_EXPLAIN, NO_TEXT_BASELINE]
    args = [*NIGHTLY_ARGS, *[a for item in light for a in ("--set", item)]]
    stray = REPO / "spark-warehouse"  # where Spark's catalog goes by default: the directory spark-submit ran in
    there_before = stray.exists()
    _, text = submit(standalone_cluster, "jobs/nightly.py", args, env, root / "nightly.log")
    assert there_before or not stray.exists(), "the job made ./spark-warehouse where spark-submit ran"
    assert (Path(settings.storage.warehouse) / "spark-catalog").is_dir()  # its catalog is in the warehouse
    return root, settings, env, text


def test_the_documented_command_is_the_tested_one():
    documented = re.sub(r"\s*\\\n\s*", " ", (REPO / "docs" / "deploy.md").read_text())
    command = shlex.join(
        spark_submit_command(
            "spark://127.0.0.1:7077", "jobs/nightly.py", *NIGHTLY_ARGS, confs=SMALL_CONFS, spark_submit="spark-submit"
        )
    )
    assert command in documented


@pytest.mark.cluster
def test_spark_submit_nightly_runs_every_stage_on_the_executors(spark, standalone_cluster, clustered):
    root, settings, _, text = clustered
    tables = Tables(spark, settings.storage)
    runs = {r["stage"]: r["status"] for r in tables.read("pipeline_runs").collect()}
    assert set(runs) >= {"ingest", "textualize", "embed", "train", "score", "profile"}, runs
    assert set(runs.values()) == {"succeeded"}, runs
    users = tables.read("user_profiles").count()
    assert users > 100 and tables.read("user_scores").count() == users

    # the training ran on the executors: each of the app's two executors ran a task of the barrier stage,
    # and rank 0's epoch log came back to the driver through TorchDistributor's log stream
    apps = [a for a in standalone_cluster.state()["completedapps"] if a["name"] == "userlens"]
    assert len(apps) == 1 and apps[0]["state"] == "FINISHED", apps
    executor_logs = standalone_cluster.executor_logs(apps[0]["id"])
    barrier = [p.parent.name for p in executor_logs if "has entered the global sync" in p.read_text(errors="replace")]
    assert len(barrier) == 2, f"barrier tasks ran on executors {barrier} of {[str(p) for p in executor_logs]}"
    assert re.search(r"userlens\.train epoch 0: train loss", text)
    # conf/log4j2.properties reached the driver before its JVM started: no INFO line from Spark (its default
    # layout is "yy/MM/dd HH:mm:ss INFO Class: ...", the shipped one "HH:mm:ss spark INFO Class: ...")
    spark_info = re.findall(r"^(?:\d\d/\d\d/\d\d )?\d\d:\d\d:\d\d (?:spark )?INFO .*$", text, re.M)
    assert spark_info == [], spark_info[:5]


@pytest.mark.cluster
def test_a_local_run_on_the_same_data_gives_the_same_results(spark, clustered, tmp_path):
    root, settings, _, _ = clustered
    cluster_tables = Tables(spark, settings.storage)
    shutil.copytree(settings.source.path, tmp_path / "raw")
    shutil.copytree(Path(settings.storage.warehouse) / "_models", tmp_path / "models")  # the same model
    local = make_settings(
        tmp_path, "profile.segments=4", "privacy.min_segment_size=10", "nightly.report=false", SHORT_TEXTS
    )
    result = run_nightly(spark, local, load_key(local.privacy, {"USERLENS_HMAC_KEY": TEST_KEY}), LAST)
    assert "train" not in result.stages  # the cluster's model is fresh: it scores here too
    local_tables = Tables(spark, local.storage)

    for table, columns in COMPARED.items():
        there, here = rows(cluster_tables, table, columns), rows(local_tables, table, columns)
        assert set(there) == set(here) and len(here) > 100, table
        differ = [u for u in here if here[u] != there[u]]
        assert not differ, f"{table}: {len(differ)} users differ, e.g. {here[differ[0]]} != {there[differ[0]]}"
    for table, column, tolerance in (
        ("user_embeddings", "embedding", 1e-5),
        ("user_scores", "purchase_propensity", 1e-6),
        ("user_scores", "churn_risk", 1e-6),
    ):
        there, here = vectors(cluster_tables, table, column), vectors(local_tables, table, column)
        assert set(there) == set(here)
        worst = max(float(np.max(np.abs(here[u] - there[u]))) for u in here)
        assert worst <= tolerance, f"{table}.{column}: max difference {worst}"


@pytest.mark.cluster
def test_killing_a_worker_while_embed_runs_still_gives_the_clean_embeddings(
    spark,
    standalone_cluster,
    clustered,
    tmp_path,
):
    """Runs last in the module: it leaves the cluster with one worker."""
    root, settings, env, _ = clustered
    warehouse = tmp_path / "warehouse"
    shutil.copytree(settings.storage.warehouse, warehouse)
    for table in ("user_embeddings", "item_embeddings"):
        shutil.rmtree(warehouse / table)
    killed: dict[str, object] = {}
    victim = standalone_cluster.processes["worker-1"]

    def kill_when_embedding(process: subprocess.Popen, log: Path) -> None:
        """Once the driver logs the embed stage and the victim's executor runs a task, SIGKILL the worker
        and the executor it launched (what losing the machine looks like)."""
        deadline = time.monotonic() + SUBMIT_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            started = "embed: user texts as of" in log.read_text(errors="replace")
            executors = _children(victim.pid)
            busy = any(
                "Running task" in p.read_text(errors="replace")
                for p in standalone_cluster.work_dir.glob("app-*/*/stderr")
                if _launched_by(p, executors)
            )
            if started and executors and busy:
                for pid in [*executors, victim.pid]:
                    os.kill(pid, signal.SIGKILL)
                killed["at"] = time.monotonic()
                killed["pids"] = [*executors, victim.pid]
                return
            time.sleep(0.2)

    drill_env = {**env, "USERLENS_WAREHOUSE": str(warehouse)}
    _, text = submit(
        standalone_cluster,
        "jobs/embed.py",
        # -v: the embed stage's start line (the kill's cue) and Spark's INFO lines in the driver's output
        ["--conf", "conf/cluster.yaml", "-v", "--set", "spark.shuffle_partitions=2", "--date", str(LAST)],
        drill_env,
        tmp_path / "embed.log",
        during=kill_when_embedding,
    )
    assert killed, "the worker was never killed: the drill did not run"
    assert victim.wait(10) == -signal.SIGKILL
    assert re.search(r"Lost executor|ExecutorLostFailure|Removed executor|executor .* lost", text, re.I), (
        "the driver never saw the executor go"
    )

    drilled = make_settings(tmp_path, f"storage.warehouse={warehouse}")
    clean, after = Tables(spark, settings.storage), Tables(spark, drilled.storage)
    there, here = vectors(clean, "user_embeddings", "embedding"), vectors(after, "user_embeddings", "embedding")
    assert set(there) == set(here) and len(here) > 100
    assert max(float(np.max(np.abs(here[u] - there[u]))) for u in here) <= 1e-5
    assert after.read("item_embeddings").count() == clean.read("item_embeddings").count()


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (the executors a worker launched)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _launched_by(stderr: Path, pids: list[int]) -> bool:
    """Whether an executor's stderr belongs to one of these executor processes (their working directory
    is the folder of their stderr)."""
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cwd").resolve() == stderr.parent.resolve():
                return True
        except OSError:
            continue
    return False
