"""User-facing jobs and the Spark code (DESIGN §2)."""
