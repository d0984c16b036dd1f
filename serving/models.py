"""Which models the query handler serves with.

The query encoder must match the vectors in the serving Milvus collection, so its version is
read from the collection the alias points at (``streams.item_index.serving_version``), never
configured separately: after ``tailbridge reindex`` moves the alias, the handler follows
(``serving.index``). A trained retriever is served from its ONNX int8 query tower when exported
(fastest), else with torch; all-MiniLM-L6-v2 from an ONNX int8 export made on first use. The
ranker is ``TAILBRIDGE_RANKER_VERSION``.

An encoder is not safe to call from two threads at once (the Hugging Face fast tokenizer
raises "Already borrowed" when two calls set its padding at the same time), so the handler
keeps ``EncoderPool``: one instance (tokenizer and ONNX session) per encoding thread, each
leased by one search at a time. The pool also remembers the vectors of recent inputs (an LRU of
``serve_query_cache_size``): a repeated head query skips the tower. The key is every input of the
call, texts and user contexts together (the trained retriever personalises the query vector,
and int8 activations are quantised per batch), so a hit returns exactly what encoding would;
a pool is one encoder version (and behaviour overlay), so a version switch starts afresh.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tailbridge.models.registry import Registry, models_root
from tailbridge.models.retrieval.encoders import MINILM_VERSION, Encoder, UnifiedEncoder, retriever_dir
from tailbridge.serving.ranker_reload import ReloadingRanker
from tailbridge.settings import Settings


def artifact_item_vectors(model_dir: Path):
    """The item vectors a retriever artifact ships (its training catalog), as a lookup for the
    query tower's user context (recent items are named by id)."""
    from tailbridge.models.retrieval.model import ITEM_IDS_FILE, ITEM_VECTORS_FILE

    ids_file, vectors_file = model_dir / ITEM_IDS_FILE, model_dir / ITEM_VECTORS_FILE
    if not (ids_file.is_file() and vectors_file.is_file()):
        return None
    rows = {item_id: i for i, item_id in enumerate(json.loads(ids_file.read_text()))}
    vectors = np.load(vectors_file)
    return lambda ids: {i: vectors[rows[i]] for i in ids if i in rows}


def load_query_encoder(version: str, settings: Settings) -> Encoder:
    from tailbridge.models.retrieval.export import (FP32_FILE, INT8_FILE, MINILM_ONNX_DIR, OnnxMiniLMEncoder,
                                                    OnnxQueryEncoder)

    if version == MINILM_VERSION:  # exported on first use: ~4x faster per query than torch on one thread
        return OnnxMiniLMEncoder(settings.data_dir / "models" / MINILM_ONNX_DIR)

    model_dir = retriever_dir(version)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"the serving collection holds vectors of {version!r}, but there is no model at "
                                f"{model_dir}: copy the artifact there or `tailbridge reindex --model` another one")
    for name, int8 in ((INT8_FILE, True), (FP32_FILE, False)):
        if (model_dir / name).is_file():
            encoder = OnnxQueryEncoder(model_dir, int8=int8, item_vectors=artifact_item_vectors(model_dir))
            encoder.version = version  # the collection's version, which the query vectors must match
            return encoder
    return UnifiedEncoder(model_dir)


def load_ranker(settings: Settings) -> Any | None:
    """The configured ranker, or None ('none', or 'auto' with nothing trained yet). Bad
    ``ranker_weights`` fail here, at start-up, rather than on every search."""
    from tailbridge.models.ranking import model as ranker

    choice = settings.ranker_version
    ranker.resolve_weights(ranker.DEFAULT_WEIGHTS, settings.ranker_weights)
    if choice == "none":
        return None
    root = settings.data_dir / "models" / "ranker"
    if choice == "auto":  # the registry's serving version (followed as it changes), else the newest trained
        registry = Registry(models_root(settings.data_dir))
        serving = registry.read().serving("ranker")
        trained = [root / version for version in ranker.known_versions(root)]
        if serving is None and not trained:
            return None
        initial = ranker.load_ranker(Path(serving.path) if serving is not None
                                     else max(trained, key=lambda p: p.stat().st_mtime))
        return ReloadingRanker(registry, ranker.load_ranker, initial)
    path = Path(choice).expanduser()
    return ranker.load_ranker(path if path.is_dir() else root / choice)


class EncoderPool:
    """``size`` instances of one encoder version and a thread for each: ``encode`` leases a
    free instance and runs it on the pool's threads, never on the event loop, unless the same
    inputs were encoded lately (``cache_size`` of them are kept)."""

    def __init__(self, version: str, encoders: list[Encoder], cache_size: int):
        self.version = version
        self._free: asyncio.Queue[Encoder] = asyncio.Queue()
        for encoder in encoders:
            self._free.put_nowait(encoder)
        self._threads = ThreadPoolExecutor(max_workers=len(encoders), thread_name_prefix=f"encode-{version}")
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()  # touched on the event loop only
        self._cache_size = cache_size

    @classmethod
    async def load(cls, version: str, load: Callable[[str], Encoder], size: int, cache_size: int) -> EncoderPool:
        """Load the instances on threads (seconds for a trained retriever): searches go on meanwhile."""
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, load, version)  # alone: it may export MiniLM on first use
        rest = await asyncio.gather(*(loop.run_in_executor(None, load, version) for _ in range(size - 1)))
        return cls(version, [first, *rest], cache_size)

    async def encode(self, texts: Sequence[str], contexts: Sequence[Mapping[str, Any] | None]) -> np.ndarray:
        """The vectors of ``texts`` with their user contexts, one row each; read-only (shared
        with later calls of the same inputs)."""
        key = (tuple(texts), orjson.dumps(list(contexts), option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY))
        vectors = self._cache.get(key)
        if vectors is not None:
            self._cache.move_to_end(key)
            return vectors
        encoder = await self._free.get()
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(self._threads, encoder.encode_queries,
                                                                       list(texts), list(contexts))
        finally:
            self._free.put_nowait(encoder)
        vectors.flags.writeable = False
        if self._cache_size:
            self._cache[key] = vectors
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return vectors

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
