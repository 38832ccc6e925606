"""The prediction tasks' names (no torch: the Spark layers and the report import these too)."""

BINARY_TASKS = ("purchase", "churn")
MULTICLASS_TASKS = ("next_category",)
TASKS = (*BINARY_TASKS, *MULTICLASS_TASKS)
