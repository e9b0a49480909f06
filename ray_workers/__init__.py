"""Ray adapters of the library (DESIGN §2): Ray Train loops, and Ray Data actor pools that process parquet shard by shard."""
