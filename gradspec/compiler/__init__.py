"""From a resolved spec to runnable steps: the typed IR, the FX lowering, its collectives and backends."""
