"""Aggregation of metric parquets, tables, summaries (pure functions of all_metrics.parquet)."""
