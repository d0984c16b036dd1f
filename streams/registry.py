"""The stream processors a worker runs (``streams.app`` makes an agent and timers for each).

A new processor is one module with a ``processor(resources) -> Processor`` factory
(``streams.processor``) and one line here.
"""

from __future__ import annotations

from tailbridge.streams import behaviour, index_seal, indexer, rewrite_feedback
from tailbridge.streams.processor import Factory

PROCESSORS: tuple[Factory, ...] = (
    behaviour.processor,  # queries + interactions -> user context, item stats, feedback log
    indexer.processor,  # catalog -> Milvus
    index_seal.processor,  # flushes what the others wrote to Milvus
    rewrite_feedback.processor,  # rewrite_feedback -> per-(query, rewrite) statistics in Redis
)
