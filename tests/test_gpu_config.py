"""The GPU cluster configuration, checked without a GPU: conf/cluster-gpu.yaml layers over cluster.yaml,
train refuses a barrier-mode GPU run whose executors have no GPU resources (one line naming the Spark key),
the discovery script prints what Spark expects, and on a local-cluster whose workers discover fake GPUs
each Spark task's encoder picks the GPU Spark gave it. The stand-ins: nvidia-smi, a discovery script and
torch's CUDA check (there is no GPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from userlens.config import load_settings
from userlens.embedding import check_gpu_conf
from userlens.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ENV = {"USERLENS_WAREHOUSE": "/w", "USERLENS_SOURCE": "/s", "USERLENS_TRAIN_PROCESSES": "4"}


def test_the_gpu_layer_turns_on_cuda_for_embed_and_train(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    settings = load_settings([str(REPO / "conf/cluster.yaml"), str(REPO / "conf/cluster-gpu.yaml")], [])
    assert settings.embed.device == "cuda" and settings.embed.dtype == "bfloat16"
    assert settings.train.use_gpu and not settings.train.local_mode and settings.train.num_processes == 4
    assert settings.storage.warehouse == "/w"  # cluster.yaml underneath still applies


@pytest.mark.parametrize(
    "conf, missing",
    [
        ({}, "spark.executor.resource.gpu.amount"),
        ({"spark.executor.resource.gpu.amount": "1"}, "spark.task.resource.gpu.amount"),
    ],
)
def test_barrier_training_on_gpu_names_the_missing_spark_key(conf, missing):
    with pytest.raises(
        ConfigError,
        match=rf"^train.use_gpu is true with train.local_mode false but {missing} is "
        r"not set: set it in spark.conf",
    ):
        check_gpu_conf(conf, "spark://10.0.0.1:7077", why="train.use_gpu is true with train.local_mode false")
    both = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "0.5"}
    assert check_gpu_conf(both, "yarn") == 0.5


def test_discovery_script_lists_the_gpus_as_spark_expects(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n3\\n'\n")  # what `--query-gpu=index --format=csv,noheader` prints
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(
        [str(REPO / "scripts/gpu-discovery.sh")], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": ["0", "1", "3"]}


def test_discovery_script_without_a_driver_fails_in_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no nvidia-smi anywhere
    result = subprocess.run(
        ["/bin/bash", str(REPO / "scripts/gpu-discovery.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "nvidia-smi not found" in result.stderr


def test_each_spark_task_picks_the_gpu_spark_assigned_it(tmp_path):
    """Spark's own resource scheduling, as its TorchDistributor tests do: a local-cluster of two workers,
    each discovering one fake GPU (addresses 0 and 1); a barrier stage puts one task on each executor."""
    script = tmp_path / "discover.sh"
    script.write_text(
        '#!/bin/sh\nif mkdir "$(dirname "$0")/gpu0.taken" 2>/dev/null; then a=0; else a=1; fi\n'
        'echo "{\\"name\\": \\"gpu\\", \\"addresses\\": [\\"$a\\"]}"\n'
    )
    script.chmod(0o755)
    out = tmp_path / "choices.json"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    result = subprocess.run(
        [sys.executable, str(REPO / "tests/gpu_task_choice.py"), str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    choices = sorted(json.loads(out.read_text()), key=lambda row: row["address"])
    assert choices == [{"address": "0", "device": "cuda:0"}, {"address": "1", "device": "cuda:1"}]
