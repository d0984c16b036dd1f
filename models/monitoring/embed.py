"""A query vector that needs no model: hashed character trigrams, for when no query encoder is
loaded (the benchmark's smoke run, a monitor without the model files). Words that were never
seen make trigrams that were never seen, which is what the query-vector drift test looks for."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

DIM = 256


def hashed_trigrams(texts: Sequence[str], dim: int = DIM) -> np.ndarray:
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        padded = f"  {text.lower()} "
        for i in range(len(padded) - 2):
            out[row, zlib.crc32(padded[i:i + 3].encode()) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-9)
