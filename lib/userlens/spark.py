"""The one place a SparkSession comes from.

- On Databricks, or under spark-submit, a session (or a SparkContext) already
  exists or is configured by the launcher: we take it and only overlay
  ``spark.conf`` entries that can be set at runtime.
- Locally (``spark.master`` in config, e.g. ``local[*]``), we build one: Delta
  extensions and catalog, the Delta jar matching the installed delta-spark via
  ``configure_spark_with_delta_pip`` (Maven Central, cached by Ivy), Arrow on,
  UTC session time zone, the project's Python for workers.

Never called at import time; refuses to run on an executor.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from userlens.config import Settings
from userlens.errors import UserlensError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"

_LOCAL_DEFAULTS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    # Delta's log replay defaults to 50 partitions: far too many for one machine.
    "spark.databricks.delta.snapshotPartitions": "2",
    "spark.sql.adaptive.enabled": "true",
    # VACUUM lists a table's files in this many tasks (default 10,000): 25-60 s for a two-file table on two
    # local cores, about 2 s with 32
    "spark.sql.sources.parallelPartitionDiscovery.parallelism": "32",
    "spark.driver.extraJavaOptions": "-Dderby.system.home=/tmp/userlens-derby",
    # no [Stage 3:=====>] bars glued to log lines: userlens logs one line per step
    "spark.ui.showConsoleProgress": "false",
}

LOG4J2_PROPERTIES = Path(__file__).parent / "conf" / "log4j2.properties"


def get_spark(settings: Settings) -> "SparkSession":
    """Return the active session (Databricks, spark-submit) or build one from settings."""
    from pyspark import TaskContext
    from pyspark.sql import SparkSession

    if TaskContext.get() is not None:
        raise UserlensError("get_spark() was called on an executor; pass the session in from the driver")

    active = SparkSession.getActiveSession()
    if active is None and (settings.spark.master is None or _launched_by_spark_submit()):
        # spark-submit or a platform configured the JVM: getOrCreate picks that up.
        builder = SparkSession.builder.appName(settings.spark.app_name)
        catalog = _submitted_catalog_dir(settings)
        if catalog is not None:
            builder = builder.config("spark.sql.warehouse.dir", catalog)
        active = builder.getOrCreate()
    if active is not None:
        _overlay_runtime_conf(active, settings)
        # the launcher's JVM logs at its own level until here (conf/log4j2.properties, passed to
        # spark-submit, quiets it from the start: docs/deploy.md)
        try:
            active.sparkContext.setLogLevel(settings.spark.log_level)
        except Exception:  # noqa: BLE001 - Spark Connect (Databricks shared clusters) has no SparkContext
            log.debug("no SparkContext here (Spark Connect); Spark's log level is the platform's")
        return active
    return _build_local(settings)


def _launched_by_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands the gateway to Python.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _submitted_catalog_dir(settings: Settings) -> str | None:
    """Under spark-submit, before the first session: the catalog's folder inside a local warehouse, unless the
    launcher set one. Otherwise Spark's catalog makes ./spark-warehouse wherever spark-submit was run."""
    from pyspark import SparkConf, SparkContext

    if not _launched_by_spark_submit() or SparkContext._active_spark_context is not None:
        return None
    if SparkConf().contains("spark.sql.warehouse.dir"):
        return None
    warehouse = settings.storage.warehouse
    local = warehouse.startswith("file://") or ":" not in warehouse.split("/", 1)[0]  # a path, or file:// URI
    return catalog_dir(warehouse) if local else None


def _overlay_runtime_conf(spark: "SparkSession", settings: Settings) -> None:
    for key, value in {
        **{"spark.sql.shuffle.partitions": str(settings.spark.shuffle_partitions)},
        **settings.spark.conf,
    }.items():
        try:
            spark.conf.set(key, value)
        except Exception:  # static confs (executor sizes, jars) belong to the launcher
            log.debug("spark conf %s is static here; leaving the launcher's value", key)


def catalog_dir(warehouse: str) -> str:
    """A local session's ``spark.sql.warehouse.dir``: ``spark-catalog`` inside the warehouse (an absolute
    path where the warehouse is a local path), so managed tables and the catalog's folder live with it."""
    root = warehouse.rstrip("/") if "://" in warehouse else os.path.abspath(warehouse)
    return f"{root}/spark-catalog"


def _build_local(settings: Settings) -> "SparkSession":
    from pyspark.sql import SparkSession

    conf = dict(_LOCAL_DEFAULTS)
    conf.update(
        {
            "spark.sql.extensions": DELTA_EXTENSION,
            "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
            "spark.sql.shuffle.partitions": str(settings.spark.shuffle_partitions),
            "spark.driver.memory": settings.spark.driver_memory,
            "spark.ui.enabled": "true" if settings.spark.ui else "false",
            # Spark's catalog otherwise makes ./spark-warehouse in whatever directory the command runs from
            "spark.sql.warehouse.dir": catalog_dir(settings.storage.warehouse),
            # log4j2 is configured before the JVM starts: Spark's start-up INFO lines and the warnings
            # userlens knows to be harmless never print (spark.log_level applies once the session is up)
            "spark.driver.extraJavaOptions": " ".join(
                [_LOCAL_DEFAULTS["spark.driver.extraJavaOptions"], f"-Dlog4j2.configurationFile={LOG4J2_PROPERTIES}"]
            ),
        }
    )
    if settings.spark.jars:
        conf["spark.jars"] = ",".join(settings.spark.jars)
    conf.update(settings.spark.conf)

    # Local workers must run the interpreter that has torch, pandas and userlens;
    # pyspark reads this variable (not a conf key) when it creates the context.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(settings.spark.master or "local[*]").appName(settings.spark.app_name)
    for key, value in conf.items():
        builder = builder.config(key, value)
    resolved = None
    if settings.spark.delta_jars == "pip" and not settings.spark.jars:
        resolved = _resolved_delta_jars()
        if resolved:  # Ivy resolved them before: the same files, without Ivy's 30 lines at each start
            builder = builder.config("spark.jars", ",".join(resolved))
        else:
            from delta import configure_spark_with_delta_pip

            builder = configure_spark_with_delta_pip(builder)
    log.info("starting local Spark (%s)", settings.spark.master or "local[*]")
    with _without_jvm_banner():
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.spark.log_level)
    if settings.spark.delta_jars == "pip" and not settings.spark.jars and not resolved:
        _remember_delta_jars(spark.sparkContext.getConf().get("spark.jars", ""))
    return spark


# The JVM prints this before any logging configuration applies: Spark's launcher always adds the module
# (its vectorised BLAS), and the JDK has no switch to keep the line quiet.
JVM_BANNER = "WARNING: Using incubator modules: jdk.incubator.vector"


@contextmanager
def _without_jvm_banner() -> Iterator[None]:
    """While pyspark starts its JVM, hand the JVM a standard error that goes through ``grep -v`` of
    :data:`JVM_BANNER`: every other line passes, for the JVM's whole life (the grep ends when the JVM does).
    Where there is no grep or standard error is not a file descriptor, nothing changes."""
    grep = shutil.which("grep")
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        saved = None
    if grep is None or saved is None:
        yield
        return
    try:
        banner = subprocess.Popen(
            [grep, "-v", "--line-buffered", "-F", "-x", JVM_BANNER], stdin=subprocess.PIPE, stdout=saved, stderr=saved
        )
    except OSError:
        os.close(saved)
        yield
        return
    assert banner.stdin is not None
    os.dup2(banner.stdin.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        banner.stdin.close()  # the JVM holds its own end of the pipe


def _delta_jars_record() -> Path:
    from importlib.metadata import version

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "userlens"
    return cache / f"delta-spark-{version('delta-spark')}.jars"


def _resolved_delta_jars() -> list[str] | None:
    """The local jar files Ivy resolved for this delta-spark version at an earlier start, if all still exist."""
    try:
        jars = _delta_jars_record().read_text().split()
    except OSError:
        return None
    paths = [jar.removeprefix("file://") for jar in jars]
    return jars if jars and all(os.path.isfile(p) for p in paths) else None


def _remember_delta_jars(spark_jars: str) -> None:
    """After Ivy's resolution (``spark.jars.packages``) ``spark.jars`` lists the resolved local files."""
    jars = [jar for jar in spark_jars.split(",") if jar.startswith(("file:", "/"))]
    if not any("delta-spark" in jar for jar in jars):
        return
    record = _delta_jars_record()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("\n".join(jars) + "\n")
        tmp.replace(record)
    except OSError:  # a read-only home: Ivy resolves (from its cache) at each start, as before
        log.debug("cannot record the resolved Delta jars in %s", record)


@contextmanager
def runtime_conf(spark: "SparkSession", values: Mapping[str, str]) -> Iterator[None]:
    """Set runtime SQL confs for the jobs (and the plans cached) inside; the previous values come back after,
    so a stage's tuning never leaks into the next stage or a caller's session."""
    previous: dict[str, str | None] = {key: spark.conf.get(key, None) for key in values}
    for key, value in values.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, old in previous.items():
            if old is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, old)
