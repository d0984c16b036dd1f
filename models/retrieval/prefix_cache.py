"""The frozen text prefix of a fixed list of texts, computed once for training.

Only the top MiniLM layers train, so the output of the embeddings + lower layers of a text never
changes: training computes it once per text (in length-sorted batches, so little padding) and
keeps it as one flat fp16 tensor of all tokens, with an offset per text. A training batch then
gathers its rows with one indexing op instead of a Python loop over per-text tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tailbridge.models.retrieval import model as unified
from tailbridge.models.retrieval.model import TextInput, UnifiedRetriever


class TextSource:
    """Token ids of the texts and, when the model has a frozen prefix, its cached output."""

    def __init__(self, model: UnifiedRetriever, fz: unified.Featurizer, texts: Sequence[str], device: torch.device,
                 batch: int, progress: Callable | None = None):
        enc = fz.tokenizer(list(texts), truncation=True, max_length=fz.cfg.max_length)
        self.ids = [list(x) for x in enc["input_ids"]]
        self.lengths = torch.tensor([len(x) for x in self.ids], dtype=torch.long)
        self.order = np.argsort([len(x) for x in self.ids], kind="stable")  # similar lengths pad less
        self.prefix: torch.Tensor | None = None
        if model.text.split == 0 or not self.ids:
            return  # everything trains: nothing to cache
        # Texts are laid out in length order, so each cached batch is one contiguous slice.
        self.offsets = torch.zeros(len(self.ids), dtype=torch.long)
        self.offsets[torch.from_numpy(self.order)] = torch.cumsum(self.lengths[self.order], 0) - self.lengths[self.order]
        self.prefix = torch.empty(int(self.lengths.sum()), model.text.hidden, dtype=torch.float16)
        with torch.inference_mode():
            for start in range(0, len(self.order), batch):
                idx = self.order[start:start + batch].tolist()
                text = self._tokens(idx).to(device)
                hidden = model.text.prefix(text.input_ids, text.attention_mask)
                first = int(self.offsets[idx[0]])
                tokens = hidden[text.attention_mask.bool()].to("cpu", torch.float16)
                self.prefix[first:first + len(tokens)] = tokens
                if progress:
                    progress(len(idx))

    def _tokens(self, idx: Sequence[int]) -> TextInput:
        ids = unified.pad([self.ids[i] for i in idx])
        return TextInput(ids, (ids != 0).long() if ids.shape[1] else ids)

    def get(self, idx: Sequence[int]) -> TextInput:
        text = self._tokens(idx)
        if self.prefix is not None:
            rows = torch.as_tensor(list(idx), dtype=torch.long)
            width = text.input_ids.shape[1]
            pos = self.offsets[rows].unsqueeze(1) + torch.arange(width)
            inside = torch.arange(width) < self.lengths[rows].unsqueeze(1)
            hidden = self.prefix[pos.clamp(max=len(self.prefix) - 1)]
            text.prefix = hidden.masked_fill(~inside.unsqueeze(-1), 0)
        return text

    def sorted_batches(self, rows: Sequence[int], batch: int) -> list[list[int]]:
        """``rows`` in batches of similar length (for encoding many texts)."""
        rows = sorted(rows, key=lambda r: len(self.ids[r]))
        return [rows[i:i + batch] for i in range(0, len(rows), batch)]
