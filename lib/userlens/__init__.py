"""userlens: Spark batch jobs that turn behavior logs into user understanding."""

__version__ = "0.1.0"
