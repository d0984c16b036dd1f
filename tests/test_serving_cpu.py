"""What the query handler does to spend less CPU per search, and that it answers the same:
the encoder pool's cache of query vectors. No stack."""

import asyncio

import numpy as np
import pytest

from tailbridge.serving.models import EncoderPool


class Counting:
    """A query encoder whose vector depends on the text and the user context, counting calls."""

    version, dim = "counting", 4

    def __init__(self):
        self.calls = 0

    def encode_queries(self, queries, user_contexts=None) -> np.ndarray:
        self.calls += 1
        contexts = user_contexts or [None] * len(queries)
        return np.array([[len(q), sum(map(ord, q)) % 97, len((c or {}).get("recent_item_ids", [])), i]
                         for i, (q, c) in enumerate(zip(queries, contexts))], dtype=np.float32)


def test_the_pool_returns_cached_vectors_only_for_the_same_texts_and_contexts():
    async def run():
        encoder = Counting()
        pool = EncoderPool("counting", [encoder], cache_size=3)
        shopper = {"recent_item_ids": ["a", "b"], "affinity_categories": ["Lamps"]}
        first = await pool.encode(["oak lamp"], [shopper])
        again = await pool.encode(["oak lamp"], [dict(reversed(shopper.items()))])  # same context, other key order
        assert encoder.calls == 1 and again is first
        assert not first.flags.writeable  # shared with later hits: nobody may change it
        with pytest.raises(ValueError):
            first[0, 0] = 0
        other_user = await pool.encode(["oak lamp"], [{"recent_item_ids": ["a"]}])
        anonymous = await pool.encode(["oak lamp"], [None])
        assert encoder.calls == 3
        assert other_user[0, 2] == 1 and anonymous[0, 2] == 0 and first[0, 2] == 2
        # Bounded (3 here): the least recently used inputs go, a hit counts as a use.
        assert await pool.encode(["oak lamp"], [shopper]) is first
        await pool.encode(["sofa"], [None])  # evicts the other user's
        assert await pool.encode(["oak lamp"], [shopper]) is first and encoder.calls == 4
        await pool.encode(["oak lamp"], [{"recent_item_ids": ["a"]}])
        assert encoder.calls == 5
        # A batch (the query and its rewrites) is its own entry: int8 activations are quantised per batch.
        both = await pool.encode(["oak lamp", "oak light"], [shopper, shopper])
        assert encoder.calls == 6 and both.shape == (2, 4)
        np.testing.assert_array_equal(first, encoder.encode_queries(["oak lamp"], [shopper]))
        pool.close()
        off = EncoderPool("counting", [encoder], cache_size=0)  # serve_query_cache_size=0: every call encodes
        calls = encoder.calls
        await off.encode(["oak lamp"], [shopper])
        await off.encode(["oak lamp"], [shopper])
        assert encoder.calls == calls + 2
        off.close()

    asyncio.run(run())


def test_feature_values_decode_as_feasts_conversion_does():
    from feast.protos.feast.types.Value_pb2 import (BoolList, DoubleList, FloatList, Int32List, Int64List, StringList,
                                                    Value)
    from feast.type_map import feast_value_type_to_python_type

    from tailbridge.feature_repo.redis_rows import RowReader

    values = [Value(double_val=0.0123), Value(float_val=0.1), Value(int64_val=-3), Value(int32_val=7),
              Value(bool_val=True), Value(string_val="Lamps"), Value(bytes_val=b"\x00\x01"), Value(),
              Value(double_list_val=DoubleList(val=[0.5, 1e-9])), Value(float_list_val=FloatList(val=[0.1, 2.0])),
              Value(int64_list_val=Int64List(val=[1, 2**40])), Value(int32_list_val=Int32List(val=[])),
              Value(bool_list_val=BoolList(val=[False])), Value(string_list_val=StringList(val=["a", "é"])),
              Value(unix_timestamp_val=1_700_000_000), Value(string_set_val={"val": ["x", "y"]})]
    for value in values:
        raw = value.SerializeToString()
        expected = feast_value_type_to_python_type(Value.FromString(raw))
        got = RowReader.value(raw)
        assert got == expected and type(got) is type(expected), value


def test_ranker_scores_equal_the_per_candidate_reference():
    """``Ranker.score`` reads each candidate's id, leaf and price once, builds the feature matrix
    through numpy and looks the item encodings up under one lock: the scores must be exactly
    those of the features computed part by part and converted by torch."""
    import torch

    from tailbridge.models.ranking import features as ft
    from tailbridge.models.ranking import model as rk

    torch.manual_seed(0)
    cfg = rk.RankerConfig(layers=1, train_layers=1, max_length=16, dim=16, hidden=16, experts=2)
    model, tokenizer = rk.build(cfg)
    ranker = rk.Ranker(model, tokenizer, "tiny")
    rng = np.random.default_rng(5)
    leaves = ["Lamps", "Rugs", "Desks"]
    items = [{"item_id": f"it{i}", "title": f"{['oak', 'walnut', 'red'][i % 3]} {leaves[i % 3].lower()} {i}",
              "brand": ["Nook", "Zed", ""][i % 3], "category_path": f"Home > {leaves[i % 3]}",
              "price": float(rng.uniform(5, 300)), "attributes": {"colour": ["red", "blue"][i % 2]}} for i in range(60)]
    ranker.catalog = ft.Catalog.from_items(items)
    shopper = {"recent_item_ids": ["it1", "it4", "it7"], "recent_actions": ["click", "add_to_cart", "purchase"],
               "affinity_categories": ["Lamps", "Rugs"], "affinity_weights": [0.7, 0.3]}
    for query, context in (("red oak lamp under $50", shopper), ("walnut desk", None), ("zed rugs", shopper)):
        candidates = [{k: v for k, v in it.items() if k != "attributes"} | {"ctr_24h": float(rng.uniform(0, .2)),
                      "cvr_24h": 0.05, "purchases_24h": int(rng.integers(0, 4)), "cart_rate_7d": 0.1, "cvr_7d": 0.02}
                      for it in rng.choice(items, 25, replace=False)]
        heads = ranker.score(query, candidates, context)
        view, asked = ft.user_view(context, ranker.catalog), ft.query_view(query, ranker.catalog)
        parts = [ft.query_item_features(asked, c, ranker.catalog) + ft.item_features(c)
                 + ft.user_item_features(c, view, ranker.catalog) for c in candidates]
        assert [ft.features(asked, c, view, ranker.catalog) for c in candidates] == parts
        with torch.inference_mode():
            p = ranker.item_vectors(candidates)
            q = ranker.query_vector(query).expand_as(p)
            expected = torch.exp(rk.log_probs(model(q, p, torch.tensor(parts, dtype=torch.float32)))).tolist()
        assert [[h[t] for t in cfg.tasks] for h in heads] == expected
        assert any(row[ft.FEATURES.index("has_user")] for row in parts) == (context is not None)  # the user part ran
