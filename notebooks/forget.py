# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: forget
# MAGIC
# MAGIC Deletes one person from every table and vacuums the old files (GDPR erasure). Same as `userlens forget`.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `user_id` | the raw user id as it appears in the source logs (required) |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC | `secret_scope` | secret scope of the HMAC key (default `userlens`; empty: the environment variable `USERLENS_HMAC_KEY`) |
# MAGIC | `secret_key` | secret name in that scope (default `hmac-key`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "forget")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
