# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: profile
# MAGIC
# MAGIC Embeddings, scores, segments, interests, RFM → `user_profiles` (MERGE, change data feed on). Same as `userlens profile`.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `date` | as-of date (empty: the newest embedding date) |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "profile")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
