"""Pure logic of the query handler: filter compilation, fusion and the final-score blend."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from milvus_lite.search.filter.tokens import TokenKind, tokenize

from tailbridge.serving.filters import compile_filters, string_literal
from tailbridge.serving.schemas import SearchFilters
from tailbridge.serving.search import RRF_K, blend, fuse


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=60))
def test_a_string_literal_is_one_token_whose_value_is_the_input(value):
    """Whatever the client sends, the expression parser sees exactly one string token."""
    tokens = [t for t in tokenize(string_literal(value)) if t.kind != TokenKind.EOF]
    assert len(tokens) == 1 and tokens[0].kind == TokenKind.STRING and tokens[0].value == value


def test_filters_compile_to_fixed_clauses():
    assert compile_filters(SearchFilters()) == ""
    expr = compile_filters(SearchFilters(category="Sofas", brand='a"b', price_min=10, price_max=20.5))
    assert expr == 'category == "Sofas" and brand == "a\\"b" and price >= 10.0 and price <= 20.5'


def test_filter_values_with_control_characters_or_bad_ranges_are_refused():
    for bad in ({"brand": "x\ny"}, {"category": "a\x00"}, {"price_min": 5, "price_max": 1},
                {"price_min": float("nan")}, {"price_max": float("inf")}):
        with pytest.raises(ValueError):
            SearchFilters(**bad)


def hit(item_id, distance=0.0):
    return {"distance": distance, "entity": {"item_id": item_id}}


def test_fusion_sums_reciprocal_ranks_and_keeps_the_best_route():
    fused = fuse([("query", "dense", [hit("a", 0.9), hit("b", 0.8)]),
                  ("query", "bm25", [hit("b", -3.0), hit("c", -2.0)]),
                  ("rewrite:couch", "dense", [hit("c", 0.7)])])
    by_id = {c.item_id: c for c in fused}
    assert by_id["b"].fused == pytest.approx(1 / (RRF_K + 2) + 1 / (RRF_K + 1))
    assert [c.item_id for c in fused] == ["b", "c", "a"]
    assert by_id["b"].source == "bm25" and by_id["b"].dense == (0.8, 2) and by_id["b"].bm25 == (-3.0, 1)
    assert by_id["c"].source == "rewrite:couch" and by_id["c"].routes == ["bm25", "rewrite:couch/dense"]


def test_a_rewrite_route_counts_its_weight_of_a_query_route():
    routes = [("query", "dense", [hit("a"), hit("b")]), ("rewrite:x", "dense", [hit("c")])]
    assert [c.item_id for c in fuse(routes, 1.0)] == ["a", "c", "b"]  # the rewrite's first ties the query's first
    weighted = fuse(routes, 0.5)
    assert [c.item_id for c in weighted] == ["a", "b", "c"]  # it adds items after the query's own
    assert weighted[2].fused == pytest.approx(0.5 / (RRF_K + 1))


def test_blend_adds_a_reciprocal_rank_prior_to_the_relative_ranker_score():
    heads = [{"score": 0.2}, {"score": 0.4}, {"score": 0.1}]  # in fused order
    blend(heads, 1.0)
    assert [h["ranker"] for h in heads] == pytest.approx([0.5, 1.0, 0.25])
    assert heads[0]["retrieval_prior"] == 1.0 and heads[2]["retrieval_prior"] == pytest.approx((RRF_K + 1) / (RRF_K + 3))
    assert [h["final"] for h in heads] == pytest.approx([h["ranker"] + h["retrieval_prior"] for h in heads])
    blend(heads, 0.0)
    assert [h["final"] for h in heads] == [h["ranker"] for h in heads]  # weight 0: the ranker alone


# ---------------------------------------------------------------------- the dependency guard


def guarded_outcomes(guard, calls):
    import asyncio

    async def run():
        return [await guard.call(call) for call in calls]

    return asyncio.run(run())


async def _answers():
    return "ok"


async def _hangs():
    import asyncio

    await asyncio.sleep(1.0)


async def _fails():
    raise ConnectionError("refused")


def test_a_failing_dependency_is_skipped_at_once_for_the_cooldown():
    from tailbridge.serving.guard import Guarded

    guard = Guarded("x", timeout_s=0.01, cooldown_s=60)
    failed, skipped = guarded_outcomes(guard, [_fails, _answers])
    assert failed.error == "ConnectionError: refused"
    assert not skipped.ok and skipped.error.startswith("skipped after a recent failure")


def test_timeouts_never_skip_the_dependency():
    """A burst of reads that missed the deadline on a busy machine must not cost the next
    searches their personalisation."""
    from tailbridge.serving.guard import Guarded

    guard = Guarded("x", timeout_s=0.01, cooldown_s=60)
    outcomes = guarded_outcomes(guard, [_hangs, _hangs, _hangs, _hangs, _answers])
    assert [o.ok for o in outcomes] == [False, False, False, False, True]
    assert outcomes[0].error == "no answer within 10 ms"


def test_item_stats_fall_back_to_the_priors_per_field():
    from tailbridge.serving.context import _stats_or_priors
    from tailbridge.vocab import NO_ITEM_STATS

    assert _stats_or_priors(None) == NO_ITEM_STATS
    # a row the worker wrote before the 7-day conversion rates existed
    old = {"ctr_24h": 0.2, "cvr_24h": 0.1, "purchases_24h": 3, "cart_rate_7d": None, "cvr_7d": None}
    got = _stats_or_priors(old)
    assert got == {**old, "cart_rate_7d": NO_ITEM_STATS["cart_rate_7d"], "cvr_7d": NO_ITEM_STATS["cvr_7d"]}
    assert NO_ITEM_STATS["cart_rate_7d"] > 0


def test_the_priors_are_what_the_worker_writes_for_an_item_without_events():
    from tailbridge.streams.item_stats import feature_row
    from tailbridge.vocab import ITEM_STATS_FIELDS, NO_ITEM_STATS

    assert tuple(NO_ITEM_STATS) == ITEM_STATS_FIELDS
    row = feature_row("", {})
    assert {field: row[field] for field in ITEM_STATS_FIELDS} == NO_ITEM_STATS
