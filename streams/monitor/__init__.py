"""Online drift monitoring: a stream processor of its own (``tailbridge monitor run``) that
compares sliding windows of queries, served results, interactions and outcomes per model version
with a pinned no-drift reference, and reports calibrated drift scores and alerts.

``core`` is the monitor itself (pure: events in, window reports out), ``processor`` runs it on
the stream and writes what it finds (Redis, Feast ``query_stats``, Prometheus, the
``drift_alerts`` topic), ``store`` reads the reports back, ``report`` renders them as HTML."""
