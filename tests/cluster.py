"""A real Spark standalone cluster for tests: one Master and two Workers on 127.0.0.1,
started with pyspark's own ``spark-class`` launcher, and the spark-submit command line
that docs/deploy.md shows.

The fixture ``standalone_cluster`` (module scope) starts the daemons, waits until the
master reports every worker ALIVE (its JSON UI, a bounded wait that fails with the
daemons' log tails), and on teardown stops exactly the processes it started."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0

DELTA_PACKAGE = f"io.delta:delta-spark_2.13:{version('delta-spark')}"
DELTA_CONFS = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
# one core per executor and per task: TorchDistributor(local_mode=False) then runs
# one training process per executor, as a barrier stage over num_processes tasks
EXECUTOR_CONFS = {"spark.executor.cores": "1", "spark.task.cpus": "1"}


def spark_home() -> Path:
    """The pyspark package directory: it carries bin/spark-class, bin/spark-submit and the jars."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def spark_submit_command(
    master_url: str, job: str, *job_args: str, confs: dict[str, str] | None = None, spark_submit: str | None = None
) -> list[str]:
    """``spark-submit`` for a userlens job on a standalone master, Delta from --packages."""
    command = [
        spark_submit or str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        master_url,
        "--packages",
        DELTA_PACKAGE,
        # the shipped log4j2 configuration before the driver's JVM starts: no INFO lines from Spark
        "--driver-java-options",
        "-Dlog4j2.configurationFile=conf/log4j2.properties",
    ]
    for key, value in {**DELTA_CONFS, **EXECUTOR_CONFS, **(confs or {})}.items():
        command += ["--conf", f"{key}={value}"]
    return [*command, job, *job_args]


def daemon_env() -> dict[str, str]:
    """Environment for the daemons and spark-submit: loopback only, the project's Python for workers."""
    return {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": HOST, "PYSPARK_PYTHON": sys.executable}


@dataclass
class StandaloneCluster:
    master_url: str
    web_url: str
    work_dir: Path
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def state(self, timeout_s: float = 30.0) -> dict:
        """The master's JSON status (workers, apps)."""
        with urllib.request.urlopen(f"{self.web_url}/json/", timeout=timeout_s) as response:
            return json.load(response)

    def log_tails(self, lines: int = 40) -> str:
        parts = []
        for name in self.processes:
            path = self.log_dir / f"{name}.log"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
            parts.append(f"--- {path} (last {lines} lines)\n" + "\n".join(text))
        return "\n".join(parts)

    def executor_logs(self, app_id: str) -> list[Path]:
        """stderr of each executor the workers launched for an app: <work_dir>/<app id>/<executor id>/stderr."""
        return sorted(self.work_dir.glob(f"{app_id}/*/stderr"))


def _launch(cluster: StandaloneCluster, name: str, main_class: str, *args: str) -> None:
    log = open(cluster.log_dir / f"{name}.log", "wb")
    try:
        cluster.processes[name] = subprocess.Popen(
            [str(spark_home() / "bin" / "spark-class"), main_class, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=daemon_env(),
        )
    finally:
        log.close()  # the child holds its own descriptor


def _wait_for_workers(cluster: StandaloneCluster, workers: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    alive, last_error = 0, None
    while time.monotonic() < deadline:
        exited = {n: p.returncode for n, p in cluster.processes.items() if p.poll() is not None}
        if exited:
            raise RuntimeError(f"Spark daemon(s) exited during start-up: {exited}\n{cluster.log_tails()}")
        try:
            alive = sum(w["state"] == "ALIVE" for w in cluster.state(5.0).get("workers", []))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # the master's UI is not up yet, or too slow to answer on a loaded machine
            alive, last_error = 0, exc
        if alive >= workers:
            return
        time.sleep(0.5)
    raise TimeoutError(
        f"{alive} of {workers} workers registered with {cluster.master_url} within "
        f"{timeout_s:.0f}s (last UI error: {last_error!r})\n{cluster.log_tails()}"
    )


def start_cluster(
    root: Path, workers: int = 2, cores: int = 1, memory: str = "1g", timeout_s: float = START_TIMEOUT_S
) -> StandaloneCluster:
    """Start a Master and ``workers`` Workers on 127.0.0.1 under ``root``; return when all are ALIVE."""
    port, web_port = free_port(), free_port()
    cluster = StandaloneCluster(f"spark://{HOST}:{port}", f"http://{HOST}:{web_port}", root / "work", root / "logs")
    cluster.work_dir.mkdir(parents=True)
    cluster.log_dir.mkdir(parents=True)
    try:
        _launch(
            cluster,
            "master",
            "org.apache.spark.deploy.master.Master",
            "--host",
            HOST,
            "--port",
            str(port),
            "--webui-port",
            str(web_port),
        )
        for i in range(workers):
            _launch(
                cluster,
                f"worker-{i}",
                "org.apache.spark.deploy.worker.Worker",
                cluster.master_url,
                "--host",
                HOST,
                "--cores",
                str(cores),
                "--memory",
                memory,
                "--work-dir",
                str(cluster.work_dir),
                "--webui-port",
                str(free_port()),
            )
        _wait_for_workers(cluster, workers, timeout_s)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: StandaloneCluster, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the daemons this helper started (workers first), SIGKILL what is left after ``timeout_s``."""
    processes = list(reversed(cluster.processes.values()))
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = start_cluster(tmp_path_factory.mktemp("standalone"))
    yield cluster
    stop_cluster(cluster)
