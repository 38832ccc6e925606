"""Text templates and the Spark expressions that render them."""
