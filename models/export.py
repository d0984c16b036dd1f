"""Serving export: the query tower as ONNX (fp32, or int8 with dynamic per-channel quantisation).

The graph takes the featurizer's tensors, user context included (an all-zero context is exactly
the no-user path, so one graph serves both):

    input_ids, attention_mask [B, L] int64   term_ids [B, T] int64   graph_rows [B] int64
    item_vectors [B, U, D] float32   item_mask [B, U] bool   actions [B, U] int64
    category_ids [B, C] int64   category_weights [B, C] float32          -> vectors [B, D]

``OnnxQueryEncoder`` runs it with onnxruntime behind the same ``encode_queries`` call as the
torch encoder, so the query handler can switch by configuration.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import unified
from models.unified import Batch, TextInput, UnifiedRetriever, UserInput

INPUTS = ("input_ids", "attention_mask", "term_ids", "graph_rows", "item_vectors", "item_mask", "actions",
          "category_ids", "category_weights")
FP32_FILE, INT8_FILE = "query_tower.onnx", "query_tower.int8.onnx"


class _QueryTower(nn.Module):
    def __init__(self, model: UnifiedRetriever):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, term_ids, graph_rows, item_vectors, item_mask, actions,
                category_ids, category_weights):
        user = UserInput(item_vectors, item_mask, actions, category_ids, category_weights)
        return self.model.encode_queries(Batch(TextInput(input_ids, attention_mask), term_ids, graph_rows, user))


def _features(fz: unified.Featurizer, queries: Sequence[str], contexts: Sequence[Mapping[str, Any] | None] | None,
              item_vectors: unified.ItemVectorLookup | None) -> dict[str, np.ndarray]:
    batch = fz.queries(queries, contexts if contexts is not None else [None] * len(queries), item_vectors)
    u = batch.user
    tensors = (batch.text.input_ids, batch.text.attention_mask, batch.term_ids, batch.graph_rows,
               u.item_vectors, u.item_mask, u.actions, u.category_ids, u.category_weights)
    return {name: t.numpy() for name, t in zip(INPUTS, tensors)}


def export_query_tower(model_dir: Path, int8: bool = True) -> list[Path]:
    """Write ``query_tower.onnx`` (and ``query_tower.int8.onnx``) into the artifact directory."""
    model_dir = Path(model_dir)
    model, fz = unified.load(model_dir)
    # Example inputs with padding and a user, so no branch of the graph is traced away.
    example = _features(fz, ["wireless earbuds under $50", "sofa"],
                        [{"recent_item_ids": ["a", "b"], "recent_actions": ["click", "purchase"],
                          "category_affinity": {"Audio": 1.0}}, None],
                        lambda ids: {i: np.full(model.cfg.dim, 0.1, np.float32) for i in ids})
    dynamic = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
               "term_ids": {0: "batch", 1: "terms"}, "graph_rows": {0: "batch"},
               "item_vectors": {0: "batch", 1: "recent"}, "item_mask": {0: "batch", 1: "recent"},
               "actions": {0: "batch", 1: "recent"}, "category_ids": {0: "batch", 1: "categories"},
               "category_weights": {0: "batch", 1: "categories"}, "vectors": {0: "batch"}}
    fp32 = model_dir / FP32_FILE
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches in transformers
        torch.onnx.export(_QueryTower(model.eval()), tuple(torch.from_numpy(example[n]) for n in INPUTS), str(fp32),
                          input_names=list(INPUTS), output_names=["vectors"], dynamic_axes=dynamic,
                          opset_version=17, dynamo=False)
    written = [fp32]
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Only the matrix products (the transformer's cost); embedding lookups stay exact.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint at WARNING
        try:
            quantize_dynamic(str(fp32), str(model_dir / INT8_FILE), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"])
        finally:
            root.setLevel(level)
        written.append(model_dir / INT8_FILE)
    return written


class OnnxQueryEncoder:
    """The exported query tower under onnxruntime; item vectors for user contexts come from
    ``item_vectors`` (e.g. ``UnifiedEncoder.item_vectors`` or an index lookup)."""

    def __init__(self, model_dir: Path, int8: bool = False, threads: int = 1,
                 item_vectors: unified.ItemVectorLookup | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        path = model_dir / (INT8_FILE if int8 else FP32_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no exported query tower (see models.export.export_query_tower)")
        model_cfg, graph = unified.read_config(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"), local_files_only=True)
        self.featurizer = unified.Featurizer(model_cfg, tokenizer, graph["queries"], graph["items"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.item_vectors = item_vectors
        self.dim = model_cfg.dim
        self.version = f"{model_dir.name}{'-int8' if int8 else ''}"

    def encode_queries(self, queries: Sequence[str],
                       user_contexts: Sequence[Mapping[str, Any] | None] | None = None) -> np.ndarray:
        if not queries:
            return np.zeros((0, self.dim), np.float32)
        return self.session.run(["vectors"], _features(self.featurizer, queries, user_contexts, self.item_vectors))[0]
