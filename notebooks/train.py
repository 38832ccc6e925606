# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: train
# MAGIC
# MAGIC Point-in-time labels → TorchDistributor → a versioned model under `storage.models`. Runs on the GPU job cluster (`databricks-gpu.yaml`). Same as `userlens train`.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `date` | as-of date; the cutoff is date − `train.horizon_days` (empty: the latest event date) |
# MAGIC | `when_due` | `true`: train only when due, as `userlens nightly` does (no model yet, or the newest is `train.retrain_days` old); the job passes `true` |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "train")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
