"""The alignment loop's rewriter step (``rewriter_step`` in tailbridge/cli/loop.py): stage 3 of the
serving rewriter again, on the partial order that shoppers' feedback gives each query's served
rewrites (per-(query, rewrite) statistics in the session's real Redis), gated against the
serving version and promoted into the registry and the rewrite store. A tiny GPT-2, never the
135M model."""

from __future__ import annotations

import uuid

import pytest
import torch
from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.models.data.loaders import load_dataset
from tailbridge.models.registry import ModelVersion, Registry
from tailbridge.models.rewrite_evidence import (
    EvidenceRule,
    RewriteEvidence,
    RouteCounts,
)
from tailbridge.models.rewriting import online
from tailbridge.models.rewriting.losses.bradley_terry import sequence_scores
from tailbridge.models.rewriting.prompts import prompt
from tailbridge.models.rewriting.search import ExactSearch
from tailbridge.models.rewriting.tokens import encode
from tailbridge.models.rewriting.versions import load_version, save_version
from tailbridge.streams.events import RewriteFeedback
from tailbridge.streams.rewrite_feedback import apply_events
from tailbridge.streams.rewrite_store import RewriteWriter

from tailbridge.cli.loop import rewriter_step
from tailbridge.synthetic import catalog as synth
from tests.rewriter_tiny import tiny_generator

GOOD, BAD = RouteCounts(60, 30, 10, 5), RouteCounts(60, 3, 0, 0)  # shown, engaged, carts, purchases
# Query key -> (rewrite the shoppers engaged with, rewrite they did not): each query's online order.
ORDERED = {f"something for my {thing}": (f"{thing} organizer", f"{thing} lamp shade")
           for thing in ("cat", "dog", "desk", "garden", "kitchen", "closet", "garage", "bathroom")}


def test_online_partial_order_needs_evidence_and_separation():
    rule = EvidenceRule(min_shown=30, demote_probability=0.9)
    none = RouteCounts()
    stats = {"cat on counter": {"cat deterrent mat": RewriteEvidence(GOOD, none), "lamp shade": RewriteEvidence(BAD, none),
                                "counter guard": RewriteEvidence(RouteCounts(10, 0), none)},  # too little shown
             "dog pulls": {"no-pull harness": RewriteEvidence(GOOD, none),
                           "dog harness": RewriteEvidence(RouteCounts(60, 29), none)}}  # not separated
    [group] = online.online_groups(stats, rule)
    texts = [c.text for c in group.candidates]
    assert group.query == "cat on counter" and [(texts[w], texts[lo]) for w, lo in group.pairs] == \
        [("cat deterrent mat", "lamp shade")]
    assert texts[group.best] == "cat deterrent mat" and group.candidates[group.best].hit_rate == 0.5
    train, held = online.split_groups([group] * 3, 0.0)
    assert len(train) == 3 and held == []


def _margin(generator, groups) -> float:
    """Mean log-likelihood margin of the preferred rewrite over the other, over the groups."""
    total = 0.0
    for g in groups:
        batch = encode(generator.tokenizer, [prompt("rewrite", g.query)] * len(g.candidates),
                       [c.text for c in g.candidates])
        with torch.no_grad():
            scores = sequence_scores(generator.model, batch)
        total += sum(float(scores[w] - scores[lo]) for w, lo in g.pairs)
    return total / len(groups)


@pytest.mark.integration
def test_loop_realigns_the_serving_rewriter_on_online_feedback(stack_settings, tmp_path):
    torch.set_num_threads(1)
    run = uuid.uuid4().hex[:8]
    settings = stack_settings.model_copy(update={
        "data_dir": tmp_path, "feast_project": f"tbrwloop_{run}", "loop_gate_tolerance": 1.0,
        "loop_holdout_fraction": 0.4, "loop_rewriter_minutes": 0.5, "rewrite_beams": 1, "rewrite_min_shown": 30})
    data_dir = tmp_path / "demo"
    synth.write(synth.generate(items=150, users=5, seed=3), data_dir)
    data = load_dataset(data_dir)
    texts = [it["title"] for it in data.items.values()] + list(data.queries.values()) + \
        [t for pair in ORDERED.values() for t in pair] + list(ORDERED)
    root = tmp_path / "models" / "rewriter"
    zero = {"relevance": 0.0, "increment": 0.0, "hit_rate": 0.0}
    save_version(tiny_generator(texts), root, "tiny-sft", {
        "stage": "sft", "parent": "tiny-base", "data": {}, "metrics": {"dev": zero},
        "settings": {"align_steps": 8, "align_epochs": 8, "align_lr": 3e-3, "dev_queries": 4, "batch_size": 4}})
    registry = Registry(tmp_path / "models")
    registry.register(ModelVersion("rewriter", "tiny-sft", str(root / "tiny-sft"), status="serving"))
    writer = RewriteWriter.from_url(resolve_online_store(settings).redis_url, settings.feast_project)
    try:
        writer.put_many("tiny-sft", {q: list(pair) for q, pair in ORDERED.items()})
        writer.promote("tiny-sft")
        search = ExactSearch(data.items)
        log = tmp_path / "no-log"

        # Too little evidence yet: the step says so and trains nothing.
        thin = settings.model_copy(update={"rewrite_min_shown": 1000})
        events = [RewriteFeedback(event_id=f"rf-{q}-{r}", query_id=f"q-{q}", user_id="u", session_id="s", query=q,
                                  query_key=q, rewrite=r, rewriter_version="tiny-sft", outcome="clicked",
                                  shown=c.shown, engaged=c.engaged, carts=c.carts, purchases=c.purchases,
                                  original_shown=60, original_engaged=10)
                  for q, (good, bad) in ORDERED.items() for r, c in ((good, GOOD), (bad, BAD))]
        assert apply_events(writer._redis, settings, events) == len(events)
        skipped = rewriter_step(thin, data_dir, log, None, None, say=lambda _: None, search=search)
        assert skipped.gate is None and skipped.candidate is None and "enough feedback" in skipped.note

        groups = online.online_groups({q: {g: RewriteEvidence(GOOD, RouteCounts()), b: RewriteEvidence(BAD, RouteCounts())}
                                       for q, (g, b) in ORDERED.items()}, EvidenceRule())
        train, held = online.split_groups(groups, settings.loop_holdout_fraction)
        assert train and held  # the split is by query key: both sides have queries here
        parent = load_version(root, "tiny-sft")
        before = _margin(parent, train)

        messages: list[str] = []
        report = rewriter_step(settings, data_dir, log, None, None, say=messages.append, search=search)
        assert report.candidate.startswith("tiny-loop-") and report.candidate.endswith("-aligned")
        assert report.parent == "tiny-sft" and report.promoted, (report, messages)
        assert _margin(load_version(root, report.candidate), train) > before  # it learned the online order

        entry = registry.read().serving("rewriter")
        assert entry.version == report.candidate and entry.parent == "tiny-sft"
        assert registry.read().get("rewriter", "tiny-sft").status == "retired"
        gate = entry.gate
        assert set(gate["candidate"]) == {"online_pair_accuracy", "relevance", "increment", "hit_rate"}
        assert gate["candidate"]["online_pair_accuracy"] is not None and gate["serving"]["online_pair_accuracy"] is not None
        assert gate["evidence"]["held_out_groups"] == len(held) and gate["evidence"]["groups"] == len(train)
        assert entry.metrics["feedback"]["source"] == "online feedback"
        # The store switched to the candidate's own rewrites for the queries the parent had.
        assert writer.serving_version() == report.candidate
        assert set(writer.keys(report.candidate)) <= set(ORDERED)
        for key in writer.keys(report.candidate):
            assert writer.live_version(key) == report.candidate
        assert not list((tmp_path / "models" / ".staging" / "rewriter").iterdir())  # moved into place whole
    finally:
        for key in writer._redis.scan_iter(f"tb:{settings.feast_project}:*", count=1000):
            writer._redis.delete(key)
