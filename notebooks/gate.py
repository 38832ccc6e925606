# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: gate
# MAGIC
# MAGIC The quality gate before profile: the night's scores and any new model against the last published version. A failed check fails the task, so profile does not run; nothing is published (docs/operations.md). Same as `userlens gate`.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `date` | as-of date (empty: the newest score date) |
# MAGIC | `force` | `true`: publish even when a check fails (after a look) |
# MAGIC | `when_enabled` | `true`: check only when `gate.enabled` is true (as nightly) |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "gate")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
