"""`spark-submit jobs/train.py` on a real Spark standalone cluster (one master, two one-core
workers on 127.0.0.1): TorchDistributor(local_mode=False) runs the two DDP processes as a
barrier stage on the executors, and the model artifact lands in the warehouse's models folder."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from cluster import daemon_env, spark_submit_command, standalone_cluster  # noqa: F401 (fixture)
from conftest import TEST_KEY, make_settings
from userlens.privacy import load_key
from userlens.runs import StageRun
from userlens.sample import SampleSpec, generate_sample
from userlens.stages.ingest import run_ingest

REPO = Path(__file__).resolve().parents[1]
SUBMIT_TIMEOUT_S = 600  # a guard against a hung barrier stage; the run takes 2.5 to 8 minutes on 2 busy cores
# small data: Delta replays its log in 2 partitions, not 50
SMALL_CONFS = {"spark.databricks.delta.snapshotPartitions": "2"}
# what docs/deploy.md shows after `jobs/train.py`; the small-data settings keep the run short
TRAIN_ARGS = ["--conf", "conf/cluster.yaml", "--set", "spark.shuffle_partitions=2",
              "--set", "train.local_mode=false", "--set", "train.num_processes=2", "--set", "train.epochs=3",
              "--set", "train.min_users=40", "--set", "train.batch_size=32"]


def run_logged(command: list[str], env: dict[str, str], log: Path) -> tuple[int | str, str]:
    """Run ``command`` from the repository root, its output to ``log`` (spark-submit logs at INFO)."""
    with log.open("wb") as sink:
        try:
            code: int | str = subprocess.run(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                             stderr=subprocess.STDOUT, timeout=SUBMIT_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:  # run() has killed it
            code = f"nothing: killed after {SUBMIT_TIMEOUT_S}s"
    return code, log.read_text(errors="replace")


def test_the_documented_command_is_the_tested_one():
    documented = re.sub(r"\s*\\\n\s*", " ", (REPO / "docs" / "deploy.md").read_text())
    command = shlex.join(spark_submit_command("spark://127.0.0.1:7077", "jobs/train.py", *TRAIN_ARGS,
                                              confs=SMALL_CONFS, spark_submit="spark-submit"))
    assert command in documented


@pytest.mark.cluster
def test_spark_submit_trains_with_torch_distributor_on_the_executors(spark, standalone_cluster, tmp_path):
    settings = make_settings(tmp_path)
    generate_sample(spark, settings.source.path, SampleSpec(users=300, days=21, seed=11))
    run_ingest(spark, settings, load_key(settings.privacy), StageRun("ingest", "r-ingest"), None, True)

    env = {**daemon_env(), "USERLENS_HMAC_KEY": TEST_KEY, "USERLENS_WAREHOUSE": settings.storage.warehouse,
           "USERLENS_SOURCE": settings.source.path}
    command = spark_submit_command(standalone_cluster.master_url, "jobs/train.py", *TRAIN_ARGS, confs=SMALL_CONFS)
    code, text = run_logged(command, env, tmp_path / "spark-submit.log")
    tail = "\n".join(text.splitlines()[-60:])
    assert code == 0, f"{shlex.join(command)}\nexited {code}; the last lines of its output:\n{tail}"

    models = Path(settings.storage.warehouse, "_models")  # conf/cluster.yaml: ${USERLENS_WAREHOUSE}/_models
    artifact = models / (models / "LATEST").read_text().strip()
    assert (artifact / "model.json").is_file()
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["training"]["world_size"] == 2 and metrics["training"]["epochs_run"] == 3
    assert set(metrics["model"]) == {"purchase", "churn", "next_category"}
    for task in ("purchase", "churn"):
        assert 0.0 <= metrics["model"][task]["auc"] <= 1.0 and metrics["model"][task]["n"] > 0
    assert 0.0 <= metrics["model"]["next_category"]["accuracy"] <= 1.0

    # The training ran on the cluster's executors: the app finished on the master, each of its two
    # executors (one per worker) ran a task of the barrier stage, and rank 0's epoch log came back
    # to the driver through TorchDistributor's log stream.
    apps = [a for a in standalone_cluster.state()["completedapps"] if a["name"] == "userlens"]
    assert len(apps) == 1 and apps[0]["state"] == "FINISHED", apps
    executor_logs = standalone_cluster.executor_logs(apps[0]["id"])
    barrier = [p.parent.name for p in executor_logs if "has entered the global sync" in p.read_text(errors="replace")]
    assert len(barrier) == 2, f"barrier tasks ran on executors {barrier} of {[str(p) for p in executor_logs]}"
    assert "Started distributed training with 2 executor processes" in text, tail
    assert re.search(r"userlens\.train epoch 2: train loss", text), tail
