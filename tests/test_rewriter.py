"""The query rewriter (models/rewriting/): bounds on what goes in and comes out (pure logic),
the partial order and the losses, and the three training stages end to end on a tiny GPT-2
over tiny demo data (seconds; never the 135M model)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings as hypothesis_settings
from hypothesis import strategies as st

from tailbridge.models.data.loaders import load_dataset
from tailbridge.models.rewriting import feedback as stage2
from tailbridge.models.rewriting.align import train_alignment
from tailbridge.models.rewriting.bounds import MAX_QUERY_CHARS, MAX_REWRITE_CHARS, MAX_REWRITE_WORDS, accept_rewrite, clean_query
from tailbridge.models.rewriting.evaluate import distinct_share, evaluate
from tailbridge.models.rewriting.generator import GeneratorError
from tailbridge.models.rewriting.intent import keep_on_intent
from tailbridge.models.rewriting.losses.bradley_terry import bradley_terry_loss, sequence_scores
from tailbridge.models.rewriting.loop import Budget
from tailbridge.models.rewriting.mining import MiningConfig, auxiliary, mine_pairs
from tailbridge.models.rewriting.search import ExactSearch
from tailbridge.models.rewriting.signals import query_signals
from tailbridge.models.rewriting.tokens import encode
from tailbridge.models.rewriting.prompts import prompt
from tailbridge.models.rewriting.train import RewriterConfig, align_version, prepare, train
from tailbridge.models.rewriting.versions import load_version, read_record, resolve
from tailbridge.synthetic import catalog as synth
from tailbridge.vocab import normalize_query
from tests.rewriter_tiny import tiny_generator

BAD_QUERIES = ["", "   ", "\x00\x01\x1b\x7f\u200b", "a" * 50_000, "dog " * 5_000, "狗绳 防止拉扯", "كلب مقود",
               "🐕🦮 leash", "dog\u202eleash\u200b", "\ud800 lone surrogate", "x", "\n\n\nsofa\n", "ＤＯＧ\tLEASH",
               "собачий поводок " * 40, "ऑफ़र " * 60]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


def _valid(query: str, rewrite: str) -> bool:
    return (bool(rewrite.strip()) and normalize_query(rewrite) != normalize_query(clean_query(query))
            and len(rewrite) <= MAX_REWRITE_CHARS and len(rewrite.split()) <= MAX_REWRITE_WORDS
            and rewrite.isprintable() and "\ufffd" not in rewrite and any(ch.isalnum() for ch in rewrite))


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.text(max_size=400))
def test_a_rewrite_is_never_empty_the_query_or_unbounded(query, generated):
    cleaned = clean_query(query)
    assert len(cleaned) <= MAX_QUERY_CHARS and cleaned.isprintable() and cleaned == cleaned.strip()
    accepted = accept_rewrite(query, generated)
    assert accepted is None or _valid(query, accepted)


def test_bounds_on_known_cases():
    assert accept_rewrite("Dog  Leash", "dog leash") is None  # the query again, once normalised
    assert accept_rewrite("dog leash", " \n\t ") is None  # nothing but spaces
    assert accept_rewrite("dog leash", "no-pull harness\nmore text") == "no-pull harness"
    long = accept_rewrite("q", " ".join(["harness"] * 40))
    assert long is not None and len(long.split()) == MAX_REWRITE_WORDS
    assert clean_query("a\x00b\tc") == "a b c" and clean_query(None) == "" and len(clean_query("w " * 999)) <= 200
    # What decoding leaves of a cut multi-byte character, and answers with nothing to search for.
    assert accept_rewrite("q", "\ufffd\ufffd\ufffd") is None and accept_rewrite("q", "dog \ufffd\ufffd leash") == "dog leash"
    assert accept_rewrite("q", "🐕 🦮 !!") is None and accept_rewrite("q", "狗绳") == "狗绳"


def test_partial_order_is_pareto_dominance():
    a, b, c = stage2.Scored("a", 0.5, 0.2, 0.3), stage2.Scored("b", 0.4, 0.2, 0.3), stage2.Scored("c", 0.9, 0.0, 0.0)
    assert stage2.partial_order([a, b, c]) == [(0, 1)]  # c is incomparable with both
    group = stage2.Group("q", [a, b, c], stage2.partial_order([a, b, c]))
    assert group.best == 0


def test_bradley_terry_loss_prefers_the_winner():
    scores = torch.tensor([2.0, 0.0, 1.0], requires_grad=True)
    loss = bradley_terry_loss(scores, [(0, 1), (2, 1)], beta=1.0)
    expected = -(torch.nn.functional.logsigmoid(torch.tensor(2.0)) + torch.nn.functional.logsigmoid(torch.tensor(1.0))) / 2
    assert torch.isclose(loss, expected)
    loss.backward()
    assert scores.grad[0] < 0 and scores.grad[2] < 0 and scores.grad[1] > 0  # descent raises winners, lowers the loser
    assert bradley_terry_loss(scores, []).item() == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rewriter")
    data_dir = root / "data"
    synth.write(synth.generate(items=300, users=5, seed=3), data_dir)
    data = load_dataset(data_dir)
    texts = [it["title"] for it in data.items.values()] + list(data.queries.values())
    return {"root": root, "data_dir": data_dir, "data": data, "search": ExactSearch(data.items),
            "make": lambda: tiny_generator(texts)}


def test_generator_survives_bad_input(tiny):
    """fp32 (training, stage 2) and int8 (the worker and the fill), greedy and beam."""
    generator = tiny["make"]()
    for model in (generator, generator.quantized()):
        for beams in (1, 2):
            out = model.rewrite(BAD_QUERIES, n=2, beams=beams)
            assert len(out) == len(BAD_QUERIES)
            assert out[0] == [] and out[1] == [] and out[2] == []  # nothing printable: no rewrite
            for query, rewrites in zip(BAD_QUERIES, out):
                assert all(_valid(query, r) for r in rewrites), (query, rewrites)
                assert len(rewrites) == len({normalize_query(r) for r in rewrites}) <= 2
    assert generator.fit_query("собачий поводок " * 40) and len(generator.tokenizer(
        generator.fit_query("ऑफ़र " * 60), add_special_tokens=False)["input_ids"]) <= 48  # bytes-split script, cut


def test_an_echo_of_the_query_is_never_a_rewrite(tiny):
    """Whatever the model says, a generation that is the query again (case, spacing, full-width
    forms, a trailing line) or nothing is dropped, and the query then has no rewrite."""
    generator = tiny["make"]()
    query = "No-Pull  Dog Harness"
    echoes = [" no-pull dog harness", "NO-PULL DOG HARNESS\nmore", " ｎｏ-ｐｕｌｌ ｄｏｇ ｈａｒｎｅｓｓ", "   ", "\n", ""]
    generator.generate = lambda prompts, beams=1, returns=1: [echoes[:returns] for _ in prompts]
    assert generator.rewrite([query], n=2, beams=len(echoes)) == [[]]
    generator.generate = lambda prompts, beams=1, returns=1: [[" no-pull dog harness", " dog lead"][:returns] for _ in prompts]
    assert generator.rewrite([query], n=2, beams=2) == [["dog lead"]]


def test_int8_generation_stops_at_the_first_line(tiny):
    generator = tiny["make"]()
    quantized = generator.quantized()
    assert quantized.int8 and not generator.int8 and quantized.quantized() is quantized
    assert generator.tokenizer.eos_token_id in generator.stop_ids
    newline = generator.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) != 1 or newline[0] in generator.stop_ids
    with pytest.raises(GeneratorError, match="generation only"):
        quantized.save(tiny["root"] / "never")


def test_mined_pairs_pass_rejection_sampling(tiny):
    data, search = tiny["data"], tiny["search"]
    signals = query_signals(data.queries, data.split("train"), data.strata, {})
    cfg = MiningConfig(min_recall=0.3)
    pairs = mine_pairs(signals, search, cfg)
    assert pairs
    by_text = {s.text: s for s in signals.values()}
    for pair in pairs[:20]:  # the kept rewrite retrieves the tail query's relevant items
        relevant = by_text[pair.source].relevant
        [top] = search.ranked([[pair.rewrite]])
        assert len(relevant.intersection(top)) / len(relevant) >= cfg.min_recall
        assert by_text[pair.source].stratum == "tail" and by_text[pair.rewrite].stratum in ("head", "torso")
    tasks = {ex.task for ex in auxiliary(signals, data.items, random.Random(0))}
    assert tasks == {"category", "keywords", "correct"}


def test_stages_write_versions_with_lineage_and_alignment_prefers_the_better_rewrite(tiny, monkeypatch):
    monkeypatch.setattr("tailbridge.models.rewriting.loop.PROGRESS_EVERY_S", 0.0)  # a progress line every step
    root = tiny["root"] / "models"
    cfg = RewriterConfig(budget_minutes=0.5, sft_steps=12, align_steps=6, align_epochs=12, sft_lr=3e-3, align_lr=3e-3,
                         feedback_queries=4, dev_queries=4, batch_size=4, candidates=2)
    messages: list[str] = []
    written = train(tiny["data_dir"], root, tiny["make"], tiny["search"], None, cfg, name="tiny", say=messages.append)
    assert written[0] == "tiny-sft"
    sft = read_record(root, "tiny-sft")
    assert sft["stage"] == "sft" and sft["parent"] == "smollm2-135m-instruct" and sft["data"]["fingerprint"]
    assert sft["metrics"]["training"]["loss_last"] < sft["metrics"]["training"]["loss_first"]
    assert sft["metrics"]["mined"]["pairs"] > 0 and set(sft["metrics"]["dev"]) >= set(stage2.SCORES)
    assert any(m.startswith(f"  step {sft['metrics']['training']['steps']} (at most 12), ") for m in messages)
    # A second run reuses the finished SFT version.
    again: list[str] = []
    train(tiny["data_dir"], root, tiny["make"], tiny["search"], None, cfg, name="tiny", stages=("sft",), say=again.append)
    assert any("reused" in m for m in again)

    # Stage 3 on a known partial order: the preferred rewrite gains on the dispreferred one.
    generator = load_version(root, "tiny-sft")
    query, good, bad = "couch for the whole family", "sofa", "lamp shade"
    group = stage2.Group(query, [stage2.Scored(good, 0.8, 0.3, 0.5), stage2.Scored(bad, 0.1, 0.0, 0.0)])
    group.pairs = stage2.partial_order(group.candidates)
    assert group.pairs == [(0, 1)]

    def margin() -> float:
        with torch.no_grad():
            scores = sequence_scores(generator.model, encode(generator.tokenizer, [prompt("rewrite", query)] * 2,
                                                             [good, bad]))
        return float(scores[0] - scores[1])

    before = margin()
    prep = prepare(tiny["data_dir"], None, cfg, "smollm2-135m-instruct")
    record = align_version(generator, [group], prep, root, "tiny-sft", "tiny-aligned", cfg, tiny["search"], 60.0,
                           {"groups": 1}, say=messages.append)
    assert margin() > before
    assert read_record(root, "tiny-aligned") == {"version": "tiny-aligned", "created": read_record(root, "tiny-aligned")["created"]} | record
    assert record["parent"] == "tiny-sft" and record["settings"]["beta"] == cfg.beta
    assert isinstance(record["metrics"]["worse_than_parent"], bool)
    assert resolve(root, stage="aligned")["version"] == "tiny-aligned"

    out = tiny["root"] / "eval"
    report = evaluate(tiny["data_dir"], tiny["search"], {"aligned": lambda: load_version(root, "tiny-aligned")},
                      out_dir=out, run_dir=out / "runs", say=lambda m: None)
    assert set(report["systems"]) == {"none", "aligned"}
    none_tail = report["systems"]["none"]["retrieval"]["tail"]
    assert none_tail["rewritten"] == none_tail["served"] == 0 and none_tail["relevance"] is None
    aligned_tail = report["systems"]["aligned"]["retrieval"]["tail"]
    assert aligned_tail["served"] == aligned_tail["rewritten"]  # no intent rule asked for: every rewrite served
    assert report["systems"]["aligned"]["retrieval"]["head"] == report["systems"]["none"]["retrieval"]["head"]
    assert json.loads((out / "rewriter-eval-test.json").read_text())["split"] == "test"
    assert (out / "rewriter-eval-test.png").stat().st_size > 0
    assert (out / "runs" / "none.trec").read_text().count(" Q0 ") >= report["queries"]


def test_alignment_stops_after_its_passes_over_the_groups(tiny):
    """Three groups, two per step, one pass: two steps, however large the step budget."""
    groups = []
    for query, good, bad in (("couch for all", "sofa", "lamp"), ("thing to sit on", "chair", "rug"),
                             ("light for reading", "desk lamp", "sofa")):
        group = stage2.Group(query, [stage2.Scored(good, 0.8, 0.3, 0.5), stage2.Scored(bad, 0.1, 0.0, 0.0)])
        group.pairs = stage2.partial_order(group.candidates)
        groups.append(group)
    stats = train_alignment(tiny["make"](), groups, Budget(100, 60.0), lr=1e-3, epochs=1.0)
    assert stats["steps"] == 2
    assert train_alignment(tiny["make"](), groups, Budget(3, 60.0), lr=1e-3, epochs=4.0)["steps"] == 3


def test_the_demo_shows_results_only_a_rewrite_retrieved():
    """make demo's rewritten example picks results whose every route is a rewrite's: the query's
    own routes did not have them among their candidates."""
    from tailbridge.cli.rewriting import _only_from_rewrites

    assert _only_from_rewrites({"parts": {"routes": ["rewrite:no-pull harness/dense", "rewrite:dog lead/bm25"]}})
    assert not _only_from_rewrites({"parts": {"routes": ["dense", "rewrite:no-pull harness/bm25"]}})
    assert not _only_from_rewrites({"parts": {"routes": []}}) and not _only_from_rewrites({"parts": None})


def test_mining_caps_the_pairs_of_each_frequent_query(tiny):
    """A few broad frequent queries overlap many tail queries; capped, no target dominates SFT."""
    signals = query_signals(tiny["data"].queries, tiny["data"].split("train"), tiny["data"].strata, {})
    uncapped = mine_pairs(signals, tiny["search"], MiningConfig(per_target=10_000))
    capped = mine_pairs(signals, tiny["search"], MiningConfig(per_target=1))
    assert max(Counter(p.rewrite for p in uncapped).values()) > 1  # the data has targets shared by tail queries
    assert max(Counter(p.rewrite for p in capped).values()) == 1
    assert {p.rewrite for p in capped} == {p.rewrite for p in uncapped}  # every target keeps its best pair
    assert distinct_share([["Sofa"], ["sofa"], ["lamp"], []]) == 0.6667 and distinct_share([[], []]) is None


def test_rewrite_routes_weigh_less_than_the_query_offline(tiny):
    """ExactSearch (what eval and stage 2 judge with) weighs a rewrite's routes as the handler
    does (``rewrite_route_weight``; ``test_serving_logic`` checks the handler's fusion): at a
    small weight the query's own order is kept and the rewrite's items come after it."""
    data = tiny["data"]
    query, rewrite = "coffee maker", "hdmi cable"
    light, even = ExactSearch(data.items, rewrite_weight=1e-6), ExactSearch(data.items, rewrite_weight=1.0)
    [own] = light.ranked([[query]])
    [fused_light], [fused_even] = light.ranked([[query, rewrite]]), even.ranked([[query, rewrite]])
    assert fused_light[:len(own)] == own[:len(fused_light)]
    assert fused_even[:len(own)] != own  # at equal weight the rewrite's items interleave


def test_exact_search_forgets_routes_past_its_bound_and_answers_the_same(tiny, monkeypatch):
    """The worker's search lives as long as the worker: it remembers at most REMEMBERED texts."""
    from tailbridge.models.rewriting import search as search_module

    search = ExactSearch(tiny["data"].items)
    texts = ["coffee maker", "hdmi cable", "stroller", "smart plug", "power bank"]
    before = search.ranked([[t] for t in texts])
    monkeypatch.setattr(search_module, "REMEMBERED", 2)
    for t in texts:
        search.ranked([[t, "usb c charger"]])
        assert len(search._routes) <= 3  # the bound, or the texts of the call in hand
    assert search.ranked([[t] for t in texts]) == before


def test_the_intent_rule_drops_a_rewrite_that_drifts_to_another_product(tiny):
    """``search.intent`` rates a rewrite's top 10 by the query's own scores against the query's
    top 10; ``keep_on_intent`` keeps what reaches the minimum, in order."""
    search = tiny["search"]
    query = "coffee maker"
    drift = "hdmi cable"  # another product: the query scores its results near zero
    [[same, other, nothing]] = search.intent([query], [[query, drift, "zzqx vvqj"]])
    assert same == 1.0 and other < 0.5 and nothing == 0.0
    kept, dropped = keep_on_intent(search, [query, "", query], [[drift, query], [], []], 0.9)
    assert kept == [[query], [], []] and dropped == 1


def test_the_worker_writes_only_what_the_intent_rule_keeps(tiny):
    """The stream's worker (``tailbridge rewriter worker --data``) applies the same rule as the
    fill before anything reaches the store (``generate`` is what ``handle`` writes)."""
    from tailbridge.settings import Settings
    from tailbridge.streams.rewrite_worker import RewriteWorker

    class Proposes:
        def rewrite(self, queries, n=1, beams=1):
            return [["hdmi cable", query] for query in queries]  # one drifts, one serves the query

    search = tiny["search"]
    worker = RewriteWorker(Settings(), Proposes(), "v", writer=None, redis_client=object(),
                           keep=lambda queries, rewrites: keep_on_intent(search, queries, rewrites, 0.9))
    assert worker.generate(["coffee maker"], deadline=float("inf")) == {"coffee maker": ["coffee maker"]}
    assert worker.counts["dropped_by_intent"] == 1


def test_the_worker_command_refuses_to_run_without_the_rules_catalog():
    """Without ``--data`` (and no ``--unchecked``) the worker would store rewrites no rule judged:
    it stops before connecting to anything and says how to go on."""
    from typer.testing import CliRunner

    from tailbridge.cli import app

    result = CliRunner().invoke(app, ["rewriter", "worker"], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert "needs --data DIR" in result.output and "--unchecked" in result.output
