"""Run by tests/test_gpu_config.py in its own process: a local-cluster whose two workers each discover one
fake GPU; a barrier stage of two tasks (so one on each executor) reports what the encoder's device choice saw."""

import json
import sys
import time

from pyspark.sql import SparkSession

script, out = sys.argv[1], sys.argv[2]
spark = (
    SparkSession.builder.master("local-cluster[2,1,1024]")
    .appName("userlens-gpu-choice")
    .config("spark.ui.enabled", "false")
    .config("spark.worker.resource.gpu.amount", "1")
    .config("spark.worker.resource.gpu.discoveryScript", script)
    .config("spark.executor.resource.gpu.amount", "1")
    .config("spark.task.resource.gpu.amount", "1")
    .getOrCreate()
)
sc = spark.sparkContext
sc.setLogLevel("ERROR")


def choose(_):
    from userlens.models import encoder

    address = encoder._task_gpu_address()
    encoder._cuda_available = lambda: True  # no GPU here: only the choice is under test
    yield {"address": address, "device": encoder.select_device("auto")}


deadline = time.monotonic() + 120
while sc._jsc.sc().getExecutorMemoryStatus().size() < 3 and time.monotonic() < deadline:  # driver + 2
    time.sleep(0.5)
rows = sc.parallelize(range(2), 2).barrier().mapPartitions(choose).collect()
with open(out, "w") as handle:
    json.dump(rows, handle)
spark.stop()
