"""The behaviour refresh (models/retrieval/behaviour.py, tailbridge/cli/behaviour.py): fold-in
math on a hand-made graph, the refresh of an overlay from logged rows, the overlay in the torch
and ONNX encoders, and one refresh on a real Milvus collection (only the changed items' vectors
move; their text, filters and content version stay; the query handler's index switches to the
new overlay with the same collection and version)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import torch

from tailbridge.models.retrieval import behaviour
from tailbridge.models.retrieval.graph import GraphFactors, spectral_factors
from tailbridge.vocab import normalize_query

torch.set_num_threads(1)

# Four queries, six items; weights as training gives them (grades, engagements).
EDGES = {("sofa", "i1"): 3.0, ("sofa", "i2"): 2.0, ("couch", "i1"): 1.0, ("couch", "i3"): 2.0,
         ("lamp", "i4"): 3.0, ("lamp", "i5"): 1.0, ("desk lamp", "i5"): 2.0, ("desk lamp", "i6"): 3.0,
         ("couch", "i2"): 1.0}


@pytest.mark.parametrize("rank", [2, 8])  # truncated, and every component
def test_a_node_folded_in_with_a_known_nodes_edges_gets_its_vector(rank):
    f = spectral_factors(EDGES, rank, seed=0)
    items, queries = f.item_rows(), f.query_rows()
    for row, item in enumerate(f.items):
        folded = f.fold_in_items({"new": {q: w for (q, i), w in EDGES.items() if i == item}})["new"]
        np.testing.assert_allclose(folded, items[row], atol=1e-5)
    for row, query in enumerate(f.queries):
        folded = f.fold_in_queries({"new": {i: w for (q, i), w in EDGES.items() if q == query}})["new"]
        np.testing.assert_allclose(folded, queries[row], atol=1e-5)
    # Scaling all of a node's weights changes nothing (its own degree is one scalar); no known
    # neighbour: no row (the model's "unknown" vector stays).
    tripled = f.fold_in_items({"x": {"sofa": 9.0, "couch": 3.0}})["x"]
    np.testing.assert_allclose(tripled, f.fold_in_items({"x": {"sofa": 3.0, "couch": 1.0}})["x"], atol=1e-6)
    assert f.fold_in_items({"y": {"never searched": 1.0}}) == {}
    assert np.allclose(np.linalg.norm(tripled), 1.0)


def test_factors_round_trip(tmp_path):
    f = spectral_factors(EDGES, 4, seed=0)
    f.log_until = ("2024-01-01T00:00:09+00:00", "s9")
    f.save(tmp_path / "g.npz")
    back = GraphFactors.load(tmp_path / "g.npz")
    assert back.queries == f.queries and back.items == f.items and back.edges == f.edges
    assert back.log_until == f.log_until and back.rank == 4
    np.testing.assert_array_equal(back.item_rows(), f.item_rows())


def log_rows(searches, start: datetime, first: int = 0) -> pd.DataFrame:
    """Feedback-log rows: one search per (query, {item: label}), one second apart."""
    rows = []
    for n, (query, labels) in enumerate(searches, start=first):
        for pos, (item, label) in enumerate(labels.items(), start=1):
            rows.append({"query_id": f"s{n:03d}", "query": query, "user_id": "u", "session_id": "x",
                         "item_id": item, "position": pos, "label": label,
                         "event_time": pd.Timestamp(start + timedelta(seconds=n))})
    return pd.DataFrame(rows)


def test_refresh_folds_in_new_items_and_queries_and_says_what_changed():
    f = spectral_factors(EDGES, 8, seed=0)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    f.log_until = ((start + timedelta(seconds=1)).isoformat(), "s001")  # the graph saw s000 and s001
    frame = log_rows([("sofa", {"i1": "purchased"}), ("lamp", {"i4": "clicked"}),
                      ("Sofa ", {"i7": "added_to_cart", "i2": "shown_unclicked"}),  # a new item
                      ("floor lamp", {"i4": "clicked", "i5": "purchased"}),  # a new query
                      ("lamp", {"i6": "clicked"})], start)  # a warm item's new edge
    first = behaviour.refresh(f, None, frame)
    assert first.searches == 3 and first.engagements == 4
    assert first.overlay.log_until == ((start + timedelta(seconds=4)).isoformat(), "s004")
    assert set(first.overlay.item_rows) == {"i4", "i5", "i6", "i7"} and first.new_items == 1
    assert set(first.overlay.query_rows) == {"sofa", "floor lamp", "lamp"} and first.new_queries == 1
    # i7 was engaged for "sofa" alone: it lands on the fold-in of a pure "sofa" item.
    np.testing.assert_allclose(first.overlay.item_rows["i7"], f.fold_in_items({"x": {"sofa": 1.0}})["x"], atol=1e-6)
    # Against the current factors: an edge to a node the graph lacks moves nothing (i4, i5 via
    # "floor lamp", "sofa" via i7), a new edge between known nodes does (i6, "lamp").
    assert first.changed_items == ["i6", "i7"] and first.changed_queries == ["floor lamp", "lamp"]
    assert first.overlay.refreshes == 1 and first.overlay.edges[("sofa", "i7")] == 2.0

    again = behaviour.refresh(f, first.overlay, frame)  # nothing logged since
    assert again.searches == 0 and again.changed_items == [] and again.changed_queries == []
    assert again.overlay.log_until == first.overlay.log_until
    later = behaviour.refresh(f, first.overlay, pd.concat([frame, log_rows([("sofa", {"i7": "purchased"})], start, 5)]))
    assert later.searches == 1 and later.overlay.refreshes == 2 and later.overlay.edges[("sofa", "i7")] == 5.0
    assert later.changed_items == [] and later.changed_queries == []  # i7's direction is the same


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny retriever artifact whose graph tables are spectral rows of a random graph, with its
    factors, and its query tower exported to ONNX (fp32)."""
    from tailbridge.models.retrieval import model as unified
    from tailbridge.models.retrieval.export import export_query_tower
    from tailbridge.models.retrieval.model import RetrieverConfig
    from tailbridge.synthetic import catalog as synth

    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    dataset = synth.generate(items=120, users=2, seed=3)
    items = [{"item_id": it.item_id, "title": it.title, "description": it.description,
              "category_path": it.category_path, "brand": it.brand, "price": it.price, "attributes": it.attributes}
             for it in dataset.items]
    queries = [q.text for q in dataset.queries][:40]
    edges = {(normalize_query(q), items[int(j)]["item_id"]): float(rng.integers(1, 4))
             for q in queries[:30] for j in rng.choice(60, 3, replace=False)}
    f = spectral_factors(edges, 8, seed=0)
    cfg = RetrieverConfig(semantic_dim=64, lexical_dim=32, behaviour_dim=16, term_buckets=1 << 14, graph_rank=8)
    model, fz = unified.build(cfg, {q: r for r, q in enumerate(f.queries)}, {i: r for r, i in enumerate(f.items)})
    with torch.no_grad():
        model.query_tower.graph.table[:] = torch.from_numpy(f.query_rows())
        model.item_tower.graph.table[:] = torch.from_numpy(f.item_rows())
    out = tmp_path_factory.mktemp("behaviour") / "tb-tiny"
    unified.save(model, fz, out)
    f.save(behaviour.factors_path(out))
    export_query_tower(out, int8=False)
    return out, f, items, queries


def test_the_overlay_reaches_the_torch_and_onnx_encoders(artifact):
    from tailbridge.models.retrieval.encoders import UnifiedEncoder
    from tailbridge.models.retrieval.export import OnnxQueryEncoder

    out, f, items, queries = artifact
    known_query, new_query = f.queries[0], normalize_query(queries[35])
    new_item = next(it for it in items[60:] if it["item_id"] not in f.items)
    assert new_query not in f.queries
    before = UnifiedEncoder(out)
    onnx_before = OnnxQueryEncoder(out)
    old_item_vec = before.encode_items([new_item])[0]
    old_query_vec = before.encode_queries([new_query])[0]

    start = datetime(2024, 1, 1, tzinfo=UTC)
    neighbours = [i for (q, i) in f.edges if q == known_query]
    frame = log_rows([(known_query, {new_item["item_id"]: "purchased"}),
                      (new_query, {neighbours[0]: "clicked", neighbours[1]: "added_to_cart"})], start)
    result = behaviour.refresh(f, None, frame)
    assert new_item["item_id"] in result.overlay.item_rows and new_query in result.overlay.query_rows
    behaviour.write_overlay(out, result.overlay, f.rank)
    assert before.outdated() and not UnifiedEncoder(out).outdated()

    after = UnifiedEncoder(out)
    row = after._featurizer.graph_items[new_item["item_id"]]
    np.testing.assert_allclose(after._model.item_tower.graph.table[row].numpy(),
                               result.overlay.item_rows[new_item["item_id"]], atol=1e-6)
    new_item_vec = after.encode_items([new_item])[0]
    assert float(new_item_vec @ old_item_vec) < 0.9999  # no longer the "unknown" behaviour block
    unchanged = [it for it in items[:60] if it["item_id"] not in result.overlay.item_rows][:5]
    np.testing.assert_allclose(after.encode_items(unchanged), before.encode_items(unchanged), atol=1e-6)

    torch_vecs = after.encode_queries([new_query, queries[0], queries[39]])
    onnx_vecs = OnnxQueryEncoder(out).encode_queries([new_query, queries[0], queries[39]])
    np.testing.assert_allclose(onnx_vecs, torch_vecs, atol=1e-4)  # the same rows through the unchanged graph
    assert float(torch_vecs[0] @ old_query_vec) < 0.9999
    np.testing.assert_allclose(onnx_before.encode_queries([queries[39]]), onnx_vecs[2:], atol=1e-5)  # untouched


def test_refresh_reupserts_only_changed_items_in_milvus(artifact, stack_settings, tmp_path):
    from tailbridge.cli.behaviour import refresh_behaviour
    from tailbridge.models.data.feedback import write_feedback
    from tailbridge.models.retrieval.encoders import UnifiedEncoder
    from tailbridge.serving.index import ServingIndex
    from tailbridge.streams import item_index
    from tailbridge.vocab import item_text

    out, f, items, queries = artifact
    (out / behaviour.OVERLAY_FILE).unlink(missing_ok=True)  # the previous test's: start from the trained rows
    settings = stack_settings.model_copy(update={"topic_prefix": f"behaviour-{out.parent.name[-8:]}"})
    milvus = item_index.connect(settings)
    version = str(out)  # a path is a version (encoders.retriever_dir)
    encoder = UnifiedEncoder(out)
    collection = item_index.create_collection(milvus, settings, version, encoder.dim)
    try:
        catalog = items[:80]
        milvus.upsert(collection, item_index.rows(catalog, encoder.encode_items(catalog), version, item_text,
                                                  updated_ms=1234))
        item_index.point_alias(milvus, settings, version)
        known_query, new_query = f.queries[0], normalize_query(queries[35])
        new_item = next(it for it in catalog[60:] if it["item_id"] not in f.items)
        neighbour = next(i for (q, i) in f.edges if q == known_query)
        write_feedback(log_rows([(known_query, {new_item["item_id"]: "purchased"}), (new_query, {neighbour: "clicked"})],
                                datetime(2024, 1, 1, tzinfo=UTC)), tmp_path / "log")
        fields = ["item_id", "vector", *item_index.CONTENT_FIELDS, "updated_ms", "model_version"]
        before = {r["item_id"]: r for r in milvus.query(collection, filter="", output_fields=fields, limit=100)}
        handler = ServingIndex(settings, encoder_threads=1)
        serving = asyncio.run(handler.refresh())
        old_query_vec = asyncio.run(serving.encoders.encode([new_query], [None]))[0]
        report = refresh_behaviour(settings, tmp_path / "log", say=lambda _: None)
        assert report.refreshed and report.refreshes == 1 and report.new_items == 1
        assert report.upserted == report.changed_items >= 1
        after = {r["item_id"]: r for r in milvus.query(collection, filter="", output_fields=fields, limit=100)}
        encoder.apply_overlay(behaviour.read_overlay(out))  # what the refresh encoded with
        expected = encoder.encode_items([new_item])[0]
        np.testing.assert_allclose(after[new_item["item_id"]]["vector"], expected, atol=1e-5)
        moved = {i for i in after if not np.allclose(after[i]["vector"], before[i]["vector"], atol=1e-6)}
        assert new_item["item_id"] in moved and len(moved) <= report.changed_items
        for item_id, row in after.items():  # content and its version untouched
            assert {k: v for k, v in row.items() if k != "vector"} == \
                   {k: v for k, v in before[item_id].items() if k != "vector"}
        assert not (out / behaviour.PENDING_FILE).exists()
        # The handler loads the new overlay beside the pool it serves with, then switches: same
        # collection and version, the new query's behaviour rows.
        refreshed = asyncio.run(handler.refresh())
        assert (refreshed.collection, refreshed.version) == (serving.collection, serving.version)
        assert refreshed.encoders is not serving.encoders
        new_query_vec = asyncio.run(refreshed.encoders.encode([new_query], [None]))[0]
        np.testing.assert_allclose(new_query_vec, encoder.encode_queries([new_query])[0], atol=1e-4)
        assert float(new_query_vec @ old_query_vec) < 0.9999
        handler.close()
        second = refresh_behaviour(settings, tmp_path / "log", say=lambda _: None, thresholds=True)
        assert not second.refreshed and "no searches logged" in second.note
    finally:
        milvus.drop_alias(item_index.alias_name(settings))
        milvus.drop_collection(collection)
