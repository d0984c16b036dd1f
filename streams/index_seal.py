"""The Milvus index seal: a processor that reads no topic and only runs periodically.

Milvus Lite scans rows not yet flushed by brute force on every search (~30 ms per 1,000), so
whatever the worker wrote to Milvus (the indexer's upserts and deletes, the item stats
mirrored into Milvus) is flushed at most every ``worker_index_seal_seconds``, and only when
something was written since the last flush.
"""

from __future__ import annotations

from tailbridge.streams import item_index
from tailbridge.streams.processor import Counts, Periodic, Processor, Resources


def processor(resources: Resources) -> Processor:
    settings, milvus, written = resources.settings, resources.milvus, resources.milvus_written

    def seal() -> Counts:
        if not written.is_set():
            return {}
        written.clear()  # before the flush: a write during it marks the next seal
        try:
            collections = item_index.live_collections(milvus, settings)
            for name in collections:
                milvus.flush(name)
        except Exception:
            written.set()  # not sealed: the retry (or the next period) flushes again
            raise
        return {"index_seals": 1}

    return Processor("index_seal", periodic=(Periodic("seal", settings.worker_index_seal_seconds, seal),))
