# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: quarantine_retention
# MAGIC
# MAGIC `events_quarantine` rows dated before as-of − `privacy.quarantine_retention_days` → deleted (one Delta DELETE, then VACUUM with the table's own retention). The stage `userlens nightly` runs after profile (docs/privacy.md, Quarantine retention).
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `date` | as-of date (empty: the as-of date of the newest succeeded ingest run in `pipeline_runs`; in the job, this run's ingest task, as `userlens nightly` does) |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "quarantine_retention")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
