# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: report
# MAGIC
# MAGIC One self-contained HTML report: model vs baseline, scores, segments, runs. Same as `userlens report`.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `out` | report file (empty: `<nightly.report_dir>/userlens-report-<date>.html`) |
# MAGIC | `when_enabled` | `true`: write the report only when `nightly.report` is true, as `userlens nightly` does; the job passes `true` |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "report")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
