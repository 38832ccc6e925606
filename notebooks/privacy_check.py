# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: privacy_check
# MAGIC
# MAGIC Every table scanned for raw user ids and PII: a pass/fail table; a fail fails the notebook (and the job's task) with one line naming the tables and columns. Same as `userlens privacy-check`; the last stage of `userlens nightly` with `nightly.privacy_check: true`.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `full` | `true`: scan every row, not only the rows added since the last passing check |
# MAGIC | `when_enabled` | `true`: check only when `nightly.privacy_check` is true, as `userlens nightly` does; the job passes `true` |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "privacy_check")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
