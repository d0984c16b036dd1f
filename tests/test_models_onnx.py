"""ONNX against torch: the query tower on 200 queries (with and without user context), and
all-MiniLM-L6-v2 int8 on 200 queries and 300 item texts (what the query handler and the stream
indexer run)."""

import numpy as np
import pytest
import torch

from tailbridge.models.retrieval import model as unified
from tailbridge.synthetic import catalog as synth
from tailbridge.models.retrieval.encoders import MINILM_VERSION, load_encoder
from tailbridge.models.retrieval.export import MINILM_ONNX_DIR, OnnxMiniLMEncoder, OnnxQueryEncoder, \
    export_query_tower, load_item_encoder
from tailbridge.synthetic.shoppers import catalog_events
from tailbridge.models.retrieval.model import RetrieverConfig
from tailbridge.vocab import normalize_query

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(3)
    dataset = synth.generate(items=120, users=2, seed=3)
    queries = [q.text for q in dataset.queries][:200]
    items = [{"item_id": it.item_id, "title": it.title, "description": it.description,
              "category_path": it.category_path, "brand": it.brand, "price": it.price, "attributes": it.attributes}
             for it in dataset.items]
    cfg = RetrieverConfig(semantic_dim=64, lexical_dim=32, behaviour_dim=16, term_buckets=1 << 14, graph_rank=8)
    model, fz = unified.build(cfg, {normalize_query(q): i for i, q in enumerate(queries[:50])},
                              {it["item_id"]: i for i, it in enumerate(items[:60])})
    with torch.no_grad():  # an untrained model has zero user weights and graph tables: give them values
        for p in (model.user.items.weight, model.user.categories.weight, model.query_tower.graph.table):
            p.normal_(std=0.1)
    out = tmp_path_factory.mktemp("onnx") / "v"
    unified.save(model, fz, out)
    export_query_tower(out, int8=True)
    return out, queries, items


def contexts_for(queries, items):
    rng = np.random.default_rng(0)
    out = []
    for i in range(len(queries)):
        if i % 2:
            out.append(None)
            continue
        recent = [items[j]["item_id"] for j in rng.choice(len(items), 5, replace=False)]
        out.append({"recent_item_ids": recent, "recent_actions": ["click"] * 5,
                    "category_affinity": {items[0]["category_path"][-1]: 0.7, "Other": 0.3}})
    return out


def test_onnx_matches_torch_on_200_queries(artifact):
    path, queries, items = artifact
    assert len(queries) == 200
    torch_encoder = load_encoder(str(path))
    torch_encoder.encode_items(items)  # remembered: user contexts can name these items
    contexts = contexts_for(queries, items)
    expected = torch_encoder.encode_queries(queries, contexts)
    for int8, floor in ((False, 0.999), (True, 0.99)):
        onnx = OnnxQueryEncoder(path, int8=int8, item_vectors=torch_encoder.item_vectors)
        got = np.concatenate([onnx.encode_queries(queries[i:i + 16], contexts[i:i + 16]) for i in range(0, 200, 16)])
        cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1)
        assert cosine.min() >= floor, f"int8={int8}: min cosine {cosine.min():.4f}"
    plain = OnnxQueryEncoder(path).encode_queries(queries[:8])
    np.testing.assert_allclose(plain, torch_encoder.encode_queries(queries[:8]), atol=1e-4)


def test_missing_export_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported query tower"):
        OnnxQueryEncoder(tmp_path)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """A data dir with all-MiniLM-L6-v2 exported where the handler and the indexer look, and the torch encoder."""
    data_dir = tmp_path_factory.mktemp("minilm-data")
    OnnxMiniLMEncoder(data_dir / "models" / MINILM_ONNX_DIR)
    return data_dir, load_encoder()


def test_minilm_onnx_int8_queries_match_torch(minilm):
    """The off-the-shelf encoder's ONNX int8 export (what the query handler serves) against torch."""
    data_dir, torch_encoder = minilm
    queries = [q.text for q in synth.generate(items=200, users=2, seed=1).queries][:200]
    onnx = OnnxMiniLMEncoder(data_dir / "models" / MINILM_ONNX_DIR)  # a second load reuses the export
    assert onnx.dim == 384
    cosine = (torch_encoder.encode_queries(queries) * onnx.encode_queries(queries)).sum(axis=1)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.98, (cosine.mean(), cosine.min())


def test_minilm_onnx_int8_items_match_torch(minilm):
    """The indexer's MiniLM item vectors (ONNX int8, batched shortest first) against torch fp32 on
    300 catalog items: close enough to share a collection with vectors torch wrote (measured: mean
    0.994, min 0.989)."""
    data_dir, torch_encoder = minilm
    items = [event.model_dump() for event in catalog_events(synth.generate(items=300, users=2, seed=4))]
    onnx = load_item_encoder(MINILM_VERSION, data_dir)
    assert isinstance(onnx, OnnxMiniLMEncoder) and onnx.version == MINILM_VERSION and onnx.batch_size < len(items)
    got = onnx.encode_items(items)
    assert got.shape == (300, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    cosine = (torch_encoder.encode_items(items) * got).sum(axis=1)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.985, (cosine.mean(), cosine.min())
    assert onnx.encode_items([]).shape == (0, 384)
