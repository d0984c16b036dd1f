"""ONNX for serving and indexing: the query tower as ONNX (fp32, or int8 with dynamic per-channel
quantisation), and all-MiniLM-L6-v2 as ONNX int8 for queries and items (``OnnxMiniLMEncoder``;
``load_item_encoder`` is what the stream indexer encodes items with).

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

from tailbridge.models.retrieval import behaviour
from tailbridge.models.retrieval import model as unified
from tailbridge.models.retrieval.model import Batch, TextInput, UnifiedRetriever, UserInput
from tailbridge.vocab import item_text

INPUTS = ("input_ids", "attention_mask", "term_ids", "graph_rows", "item_vectors", "item_mask", "actions",
          "category_ids", "category_weights")
FP32_FILE, INT8_FILE = "query_tower.onnx", "query_tower.int8.onnx"
QUERY_GRAPH_TABLE = "model.query_tower.graph.table"  # the query side's graph rows, an initializer of the export


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
        written.append(quantize(fp32, model_dir / INT8_FILE))
    return written


def quantize(fp32: Path, int8: Path) -> Path:
    """Dynamic int8, per channel, of the matrix products only (the transformer's cost);
    embedding lookups stay exact."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint at WARNING
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)
    return int8


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
            raise FileNotFoundError(f"{path}: no exported query tower (see models.retrieval.export.export_query_tower)")
        model_cfg, graph = unified.read_config(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"), local_files_only=True)
        self.overlay_stamp = behaviour.overlay_stamp(model_dir)
        overlay = behaviour.read_overlay(model_dir)
        source: str | bytes = str(path)
        if overlay is not None and overlay.query_rows:
            source, graph["queries"] = with_query_rows(path, graph["queries"], overlay.query_rows)
        self.featurizer = unified.Featurizer(model_cfg, tokenizer, graph["queries"], graph["items"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.item_vectors = item_vectors
        self.dim = model_cfg.dim
        self.version = f"{model_dir.name}{'-int8' if int8 else ''}"

    def encode_queries(self, queries: Sequence[str],
                       user_contexts: Sequence[Mapping[str, Any] | None] | None = None) -> np.ndarray:
        if not queries:
            return np.zeros((0, self.dim), np.float32)
        return self.session.run(["vectors"], _features(self.featurizer, queries, user_contexts, self.item_vectors))[0]


def with_query_rows(path: Path, rows: Mapping[str, int], overlay_rows: Mapping[str, np.ndarray]
                    ) -> tuple[bytes, dict[str, int]]:
    """The exported query tower with a behaviour overlay's query rows in its graph table, and the
    key -> row map that goes with it. The table is an initializer (data, not graph): only it
    changes, so the exported graph and its int8 weights stay exactly as they were."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    found = [t for t in proto.graph.initializer if t.name == QUERY_GRAPH_TABLE]
    if not found:
        raise ValueError(f"{path}: no initializer {QUERY_GRAPH_TABLE!r} (exported before graph rows were data?); "
                         "export the query tower again (models.retrieval.export.export_query_tower)")
    table, rows = behaviour.extend_table(numpy_helper.to_array(found[0]), rows, overlay_rows)
    found[0].CopyFrom(numpy_helper.from_array(table, QUERY_GRAPH_TABLE))
    return proto.SerializeToString(), rows


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (the off-the-shelf encoder) as ONNX int8, for the query handler and the indexer
# --------------------------------------------------------------------------------------------

MINILM_ONNX_DIR = "minilm-l6-v2-onnx"  # under DATA_DIR/models: one export per data dir


class _MeanPooledMiniLM(nn.Module):
    """MiniLM as sentence-transformers uses it: mean pooling over real tokens, then L2 norm."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def export_minilm(out_dir: Path) -> Path:
    """Write all-MiniLM-L6-v2 (from the installed package) as ONNX fp32 and int8 plus its
    tokenizer into ``out_dir``; returns the int8 file. Takes seconds; done once per data dir.
    Written beside and renamed into place, so a reader never sees half an export."""
    import os
    import shutil

    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    building = out_dir.with_name(f"{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    hf_logging.disable_progress_bar()
    path = unified.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = _MeanPooledMiniLM(AutoModel.from_pretrained(path, local_files_only=True).eval())
    example = tokenizer(["wireless earbuds under $50", "sofa"], padding=True, return_tensors="pt")
    fp32 = building / FP32_FILE
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example["input_ids"], example["attention_mask"]), str(fp32),
                          input_names=["input_ids", "attention_mask"], output_names=["vectors"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "vectors": {0: "batch"}},
                          opset_version=17, dynamo=False)
    tokenizer.save_pretrained(building / "tokenizer")
    quantize(fp32, building / INT8_FILE)
    try:
        building.rename(out_dir)
    except OSError:  # another process finished first: use its export
        shutil.rmtree(building, ignore_errors=True)
    return out_dir / INT8_FILE


class OnnxMiniLMEncoder:
    """all-MiniLM-L6-v2 on onnxruntime int8, queries and items (~4x faster than torch on one
    thread; cosine to torch >= 0.99 on demo queries and item texts: tests/test_models_onnx.py).
    Not personalised: user contexts are ignored, as by ``MiniLMEncoder``."""

    def __init__(self, model_dir: Path, threads: int = 1, max_length: int = 128, batch_size: int = 32):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from tailbridge.models.retrieval.encoders import MINILM_VERSION

        model_dir = Path(model_dir)
        if not (model_dir / INT8_FILE).is_file():
            export_minilm(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"), local_files_only=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_dir / INT8_FILE), options, providers=["CPUExecutionProvider"])
        self.max_length, self.batch_size = max_length, batch_size
        self.version = MINILM_VERSION
        self.dim = self.session.get_outputs()[0].shape[-1]

    def encode_queries(self, queries: Sequence[str],
                       user_contexts: Sequence[Mapping[str, Any] | None] | None = None) -> np.ndarray:
        batch = self.tokenizer(list(queries), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="np")
        feeds = {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
        return self.session.run(["vectors"], feeds)[0]

    def encode_items(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Item texts (``vocab.item_text``, as the torch encoder reads them) in batches of
        ``batch_size``, shortest first: a batch pads to its own longest text, not the longest of all."""
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        token_ids = self.tokenizer([item_text(item) for item in items], truncation=True,
                                   max_length=self.max_length)["input_ids"]
        out = np.empty((len(items), self.dim), dtype=np.float32)
        order = sorted(range(len(items)), key=lambda i: len(token_ids[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(token_ids[i]) for i in rows)
            input_ids = np.full((len(rows), width), self.tokenizer.pad_token_id, dtype=np.int64)
            attention_mask = np.zeros((len(rows), width), dtype=np.int64)
            for k, i in enumerate(rows):
                input_ids[k, :len(token_ids[i])] = token_ids[i]
                attention_mask[k, :len(token_ids[i])] = 1
            out[rows] = self.session.run(["vectors"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        return out


def load_item_encoder(version: str, data_dir: Path):
    """The encoder the stream indexer writes ``version``'s item vectors with: all-MiniLM-L6-v2 on
    ONNX int8 (exported into ``DATA_DIR/models`` on first use), any other version as
    ``encoders.load_encoder`` loads it. MiniLM's int8 item vectors keep cosine >= 0.99 to its
    torch fp32 ones, so they share one collection (and version) with vectors torch wrote."""
    from tailbridge.models.retrieval.encoders import MINILM_VERSION, load_encoder

    if version == MINILM_VERSION:
        return OnnxMiniLMEncoder(Path(data_dir) / "models" / MINILM_ONNX_DIR)
    return load_encoder(version)
