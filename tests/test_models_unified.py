"""The unified retriever's towers: fusion, gradients, the no-user path, fallbacks, artifacts."""

import numpy as np
import pytest
import torch

from tailbridge.models.retrieval import model as unified
from tailbridge.models.retrieval.encoders import UnifiedEncoder, load_encoder
from tailbridge.models.retrieval.losses import masked_contrastive_loss
from tailbridge.models.retrieval.model import RetrieverConfig

torch.set_num_threads(1)

CFG = RetrieverConfig(semantic_dim=32, lexical_dim=16, behaviour_dim=8, term_buckets=4096, graph_rank=4,
                      user_items=4, category_buckets=64, max_length=32)
ITEMS = [
    {"item_id": "a", "title": "Voltra 20V Cordless Drill (VO-4411)", "description": "Brushless motor.",
     "category_path": ["Hardware", "Power Tools", "Drills"], "brand": "Voltra", "price": 99.0,
     "attributes": {"voltage": "20V"}},
    {"item_id": "b", "title": "Harlow Velvet Sofa, Navy", "description": "",
     "category_path": ["Furniture", "Sofas"], "brand": "Harlow", "price": 899.0, "attributes": {}},
    {"item_id": "new", "title": "Glowbar Hair Dryer", "description": "",  # not in the graph
     "category_path": ["Beauty"], "brand": "Glowbar", "price": 49.0, "attributes": {}},
]
USER = {"recent_item_ids": ["a", "unknown-item", "b"], "recent_actions": ["purchase", "click", "click"],
        "category_affinity": {"Hardware": 0.8, "Furniture": 0.2}}


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    model, fz = unified.build(CFG, graph_queries={"sofa": 0}, graph_items={"a": 0, "b": 1})
    model.query_tower.graph.table.copy_(torch.randn_like(model.query_tower.graph.table))
    model.item_tower.graph.table.copy_(torch.randn_like(model.item_tower.graph.table))
    return model, fz


def item_lookup(model, fz):
    with torch.no_grad():
        vecs = model.encode_items(fz.items(ITEMS)).numpy()
    return lambda ids: {i: vecs[j] for j, i in enumerate(it["item_id"] for it in ITEMS) if i in ids}


def test_vectors_are_unit_and_the_dot_product_is_the_fused_similarity(built):
    model, fz = built
    model.eval()
    with torch.no_grad():
        q = model.encode_queries(fz.queries(["cordless drill", "sofa"]))
        items = model.encode_items(fz.items(ITEMS))
    assert q.shape == (2, CFG.dim) and items.shape == (3, CFG.dim)
    assert torch.allclose(q.norm(dim=1), torch.ones(2), atol=1e-5)
    # Dot product == sum_k w_k cos_k over the three blocks (the post-fusion).
    w = model.fusion_weights()
    bounds = np.cumsum([0, CFG.semantic_dim, CFG.lexical_dim, CFG.behaviour_dim])
    cos = [torch.nn.functional.cosine_similarity(q[0, a:b], items[0, a:b], dim=0) for a, b in zip(bounds, bounds[1:])]
    assert (q[0] @ items[0]).item() == pytest.approx(sum(wk * ck for wk, ck in zip(w, cos)).item(), abs=1e-5)
    assert (q[0] @ items.T).argmax().item() == 0  # an untrained model already finds the drill


def test_lexical_block_keeps_exact_model_numbers():
    # Random term vectors are a random projection of TF-IDF: wide enough, exact matches stand out.
    torch.manual_seed(0)
    model, fz = unified.build(RetrieverConfig(lexical_dim=128, term_buckets=1 << 16))
    with torch.no_grad():
        lexical = model.terms(fz.queries(["vo-4411"]).term_ids)
        item_lex = model.terms(fz.items(ITEMS).term_ids)
    sims = (lexical @ item_lex.T)[0]
    assert sims[0] > 0.1 and sims[0] > 2 * sims[1:].max()


def test_gradients_reach_every_tower(built):
    model, fz = built
    model.train()
    model.zero_grad()
    # Nonzero user projections, so that the user path has a gradient to pass on.
    with torch.no_grad():
        model.user.items.weight.normal_(std=0.1)
        model.user.categories.weight.normal_(std=0.1)
    lookup = item_lookup(model, fz)
    q = model.encode_queries(fz.queries(["sofa", "drill for my deck"], [USER, USER], lookup))
    items = model.encode_items(fz.items(ITEMS))
    # A margin no score gap reaches: nothing is masked, so every candidate passes a gradient.
    masked_contrastive_loss(q, items[[1, 0]], items[2:], margin=10.0).loss.backward()
    parts = {
        "text (trainable MiniLM layers)": model.text.bert.encoder.layer[-1].output.dense.weight,
        "term table": model.terms.table.weight,
        "query semantic": model.query_tower.semantic.weight, "item semantic": model.item_tower.semantic.weight,
        "query lexical": model.query_tower.lexical.weight, "item lexical": model.item_tower.lexical.weight,
        "query graph": model.query_tower.graph.proj.weight, "item graph": model.item_tower.graph.proj.weight,
        "query graph unknown": model.query_tower.graph.unknown, "item graph unknown": model.item_tower.graph.unknown,
        "user items": model.user.items.weight, "user categories": model.user.categories.weight,
        "user action weights": model.user.action_weight.weight, "fusion": model.fusion_logits,
    }
    for name, param in parts.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    frozen = model.text.bert.encoder.layer[0].output.dense.weight
    assert not frozen.requires_grad and frozen.grad is None


def test_no_user_path_is_unchanged_and_context_changes_the_query(built):
    model, fz = built
    model.eval()
    with torch.no_grad():
        model.user.items.weight.normal_(std=0.1)
        model.user.categories.weight.normal_(std=0.1)
        lookup = item_lookup(model, fz)
        queries = ["sofa", "sofa", "sofa"]
        plain = model.encode_queries(fz.queries(queries))
        empty = model.encode_queries(fz.queries(queries, [None, {}, {"recent_item_ids": ["nope"]}], lookup))
        personal = model.encode_queries(fz.queries(queries, [USER, None, USER], lookup))
    assert torch.equal(plain, empty)  # no user, an empty context, or only unknown items: the same vector
    assert torch.equal(personal[1], plain[1])
    assert not torch.allclose(personal[0], plain[0])
    assert torch.equal(personal[0], personal[2])


def test_feast_affinity_arrays_equal_the_mapping(built):
    model, fz = built
    with torch.no_grad():
        model.user.categories.weight.normal_(std=0.1)
        lookup = item_lookup(model, fz)
        feast_row = {"recent_item_ids": USER["recent_item_ids"], "recent_actions": USER["recent_actions"],
                     "affinity_categories": list(USER["category_affinity"]),
                     "affinity_weights": list(USER["category_affinity"].values())}
        a = model.encode_queries(fz.queries(["sofa"], [USER], lookup))
        b = model.encode_queries(fz.queries(["sofa"], [feast_row], lookup))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="2 affinity_categories but 1 affinity_weights"):
        fz.queries(["sofa"], [{"affinity_categories": ["a", "b"], "affinity_weights": [1.0]}], lookup)


def test_dimension_is_configurable():
    assert RetrieverConfig.of_dim(384) == RetrieverConfig()  # the default blocks: 256 + 96 + 32
    cfg = RetrieverConfig.of_dim(100)
    assert cfg.dim == 100 and min(cfg.semantic_dim, cfg.lexical_dim, cfg.behaviour_dim) > 0
    with pytest.raises(ValueError, match="at least 12"):
        RetrieverConfig.of_dim(8)


def test_fresh_model_ignores_user_context():
    model, fz = unified.build(CFG)
    with torch.no_grad():
        lookup = item_lookup(model, fz)
        a = model.encode_queries(fz.queries(["sofa"]))
        b = model.encode_queries(fz.queries(["sofa"], [USER], lookup))
    assert torch.equal(a, b)


def test_nodes_without_edges_fall_back_to_the_unknown_vector(built):
    model, fz = built
    model.eval()
    batch = fz.items(ITEMS)
    assert batch.graph_rows.tolist() == [0, 1, -1]
    q = fz.queries(["sofa", "a query never seen"])
    assert q.graph_rows.tolist() == [0, -1]
    with torch.no_grad():
        behaviour = model.item_tower.graph(batch.graph_rows)
        vectors = model.encode_items(batch)
    assert torch.equal(behaviour[2], model.item_tower.graph.unknown)
    assert not torch.equal(behaviour[0], model.item_tower.graph.unknown)
    assert torch.isfinite(vectors).all()


def test_title_only_and_empty_fields(built):
    model, fz = built
    bare = [{"item_id": "x", "title": "Plain Mug", "description": None, "category_path": [], "brand": "",
             "price": 3.0, "attributes": {}}]
    with torch.no_grad():
        v = model.encode_items(fz.items(bare))
        empty_query = model.encode_queries(fz.queries([""]))
    assert torch.isfinite(v).all() and v.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(empty_query).all()


def test_artifact_round_trip_and_load_encoder(built, tmp_path):
    model, fz = built
    model.eval()
    unified.save(model, fz, tmp_path / "v1")
    encoder = load_encoder(str(tmp_path / "v1"))
    assert isinstance(encoder, UnifiedEncoder) and encoder.dim == CFG.dim and encoder.version == "v1"
    with torch.no_grad():
        expected_items = model.encode_items(fz.items(ITEMS)).numpy()
        expected_q = model.encode_queries(fz.queries(["sofa", "drill"])).numpy()
    np.testing.assert_allclose(encoder.encode_items(ITEMS), expected_items, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_queries(["sofa", "drill"]), expected_q, atol=1e-5)
    # The encoder remembers what it encoded, so a user context naming those items works.
    personal = encoder.encode_queries(["sofa"], [USER])
    with torch.no_grad():
        direct = model.encode_queries(fz.queries(["sofa"], [USER], item_lookup(model, fz))).numpy()
    np.testing.assert_allclose(personal, direct, atol=1e-5)
    with pytest.raises(ValueError, match="2 user contexts for 1 queries"):
        encoder.encode_queries(["sofa"], [None, None])


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder version 'nope'"):
        load_encoder("nope")
    (tmp_path / "broken").mkdir()
    with pytest.raises(FileNotFoundError, match="not a retriever artifact"):
        load_encoder(str(tmp_path / "broken"))
