# Databricks notebook source
# MAGIC %md
# MAGIC # userlens: embed
# MAGIC
# MAGIC `user_texts`, `items` → `user_embeddings`, `item_embeddings` with the encoder `embed.model`; only changed texts are embedded. Runs on the GPU job cluster (`databricks-gpu.yaml`). Same as `userlens embed`.
# MAGIC
# MAGIC Widgets (job parameters of the same name):
# MAGIC
# MAGIC | widget | meaning |
# MAGIC |---|---|
# MAGIC | `date` | as-of date of the texts (empty: the latest) |
# MAGIC | `conf` | config files layered over `base.yaml`, comma-separated; a bare name is a file shipped with userlens (default `databricks.yaml`; GPU tasks add `databricks-gpu.yaml`), anything else a path |
# MAGIC | `set` | overrides `dotted.key=value`, separated by `;` (e.g. `storage.schema=userlens_dev; train.epochs=10`) |
# MAGIC
# MAGIC The widgets are checked by `userlens.notebook`; the work is done by the library. Run on a cluster with the userlens wheel installed (`databricks.yml`).

# COMMAND ----------

from userlens import notebook

notebook.log_progress()
params = notebook.read_widgets(dbutils, "embed")

# COMMAND ----------

result, skipped = notebook.run_stage(dbutils, params)
