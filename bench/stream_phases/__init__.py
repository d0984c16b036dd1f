"""The phases of the stream benchmark (``python -m tailbridge.bench.streams``), one module each:

- ``throughput``: events/s the worker applies from a pre-published backlog;
- ``freshness``: time from a probe click's send until Feast serves it, at 1,000 events/s;
- ``vectors``: time from a catalog update's send until Milvus serves it, at 50 updates/s;
- ``consume``: the same on a faust agent that only decodes (the ceiling below the worker);
- ``stages``: the worker's processors in-process, timed stage by stage.

``namespace`` holds what they all use (their sizes, a namespace of their own on the stack),
``report`` turns the runs into tables and verdicts.
"""
