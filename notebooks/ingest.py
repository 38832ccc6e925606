# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: ingest
# MAGIC
# MAGIC Raw logs (`source.path`) → `events`, `events_quarantine`, `items`: rows are validated, bad ones quarantined with a reason, user ids pseudonymized with the HMAC key, PII scrubbed. Same as `userlens ingest`.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `date` | ingest raw dates up to this one, YYYY-MM-DD (empty: the latest) |
# MAGIC | `full` | `true`: re-ingest every raw date |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC | `secret_scope` | secret scope of the HMAC key (default `userlens`; empty: the environment variable `USERLENS_HMAC_KEY`) |
# MAGIC | `secret_key` | secret name in that scope (default `hmac-key`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "ingest")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
