"""userlens.progress: the task bar a stage draws on a terminal, from Spark's status tracker."""

from __future__ import annotations

import io
import re

from userlens import progress


def test_the_bar_counts_the_stages_tasks_and_leaves_the_job_group_as_it_was(spark):
    sc = spark.sparkContext
    sc.setJobGroup("outer", "a caller's group")
    out = io.StringIO()
    progress.configure(True)
    try:
        with progress.spark_progress(spark, "count", file=out, interval_s=0.05):
            n = spark.range(0, 10_000, numPartitions=7).count()
            inner = sc.getLocalProperty("spark.jobGroup.id")
    finally:
        progress.configure(None)
    assert n == 10_000
    assert inner.startswith("userlens-count-")
    done, total = progress.task_counts(sc, inner)
    assert done == total >= 8  # the 7 partitions' tasks and the count's final one, at least
    bars = re.findall(r"count: .*?(\d+)/(\d+)", out.getvalue())
    assert bars and bars[-1][0] == bars[-1][1] == str(total)  # the last draw: every task done
    assert sc.getLocalProperty("spark.jobGroup.id") == "outer"


def test_no_bar_and_no_job_group_when_not_wanted(spark):
    sc = spark.sparkContext
    sc.setLocalProperty("spark.jobGroup.id", None)
    out = io.StringIO()
    progress.configure(False)
    try:
        with progress.spark_progress(spark, "count", file=out):
            assert spark.range(100).count() == 100
            inside = sc.getLocalProperty("spark.jobGroup.id")
    finally:
        progress.configure(None)
    assert out.getvalue() == "" and inside is None
