# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: nightly
# MAGIC
# MAGIC Every stage for one as-of date, incrementally, in one notebook: ingest → textualize → embed → train (when due) → score → profile → quarantine_retention → report → privacy_check (with `nightly.privacy_check`). Same as `userlens nightly`. The `userlens_nightly` job in `databricks.yml` runs the stage notebooks as separate tasks instead.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `date` | as-of date (empty: the newest raw date) |
# MAGIC | `report_out` | report file (empty: `<nightly.report_dir>/userlens-report-<date>.html`) |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC | `secret_scope` | secret scope of the HMAC key (default `userlens`; empty: the environment variable `USERLENS_HMAC_KEY`) |
# MAGIC | `secret_key` | secret name in that scope (default `hmac-key`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "nightly")

# COMMAND ----------

result = notebook.run_nightly(dbutils, params)
