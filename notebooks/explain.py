# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: explain
# MAGIC
# MAGIC The days that moved each score most, for a sample of the night's users (occlusion over days) → `user_scores.explanations`. Off the critical path: after profile. Same as `userlens explain`.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `date` | as-of date (empty: the newest score date) |
# MAGIC | `when_enabled` | `true`: explain only when `explain.users` is not `none` (as nightly) |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "explain")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
