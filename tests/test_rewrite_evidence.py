"""The rule that demotes or drops a failing rewrite (models/rewrite_evidence.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tailbridge.models.rewrite_evidence import (EvidenceRule, RewriteEvidence, RouteCounts, order_rewrites,
                                                prob_worse, verdict)


def _ev(shown: int, engaged: int, orig_shown: int, orig_engaged: int) -> RewriteEvidence:
    return RewriteEvidence(RouteCounts(shown, engaged), RouteCounts(orig_shown, orig_engaged))


def test_prob_worse_hand_computed():
    # Rewrite Beta(1, 4) against original Beta(2, 3): P(X < Y) = int 4(1-x)^3 [(1-x)^4 + 4x(1-x)^3] dx
    # = 4/8 + 16 B(2, 7) = 1/2 + 16/56 = 0.785714...
    assert prob_worse(_ev(3, 0, 3, 1)) == pytest.approx(0.5 + 16 / 56)
    assert prob_worse(_ev(60, 6, 60, 6)) == pytest.approx(0.5)  # same counts: a coin flip
    assert prob_worse(_ev(3, 1, 3, 0)) == pytest.approx(1 - (0.5 + 16 / 56))  # the mirror image


def test_prob_worse_matches_sampling():
    rng = np.random.default_rng(0)
    x, y = rng.beta(1 + 4, 1 + 36, 200_000), rng.beta(1 + 10, 1 + 30, 200_000)
    assert prob_worse(_ev(40, 4, 40, 10)) == pytest.approx(float((x < y).mean()), abs=0.005)


def test_minimum_evidence_then_demote_then_drop():
    rule = EvidenceRule(min_shown=30, demote_probability=0.9, drop_probability=0.99)
    assert verdict(_ev(10, 0, 10, 8), rule) == "keep"  # clearly failing, but one or two searches only
    assert verdict(_ev(30, 3, 30, 9), rule) == "demote"  # P = 0.97
    assert verdict(_ev(30, 1, 30, 12), rule) == "drop"  # P = 0.9998
    assert verdict(_ev(300, 30, 300, 31), rule) == "keep"  # as good as the original
    assert verdict(_ev(300, 60, 300, 30), rule) == "keep"  # better


def test_order_rewrites():
    evidence = {"good": _ev(100, 20, 100, 20), "meh": _ev(30, 3, 30, 9), "bad": _ev(100, 2, 100, 20)}
    served, verdicts = order_rewrites(["meh", "bad", "new", "good"], evidence)
    assert served == ["new", "good", "meh"]  # unjudged and kept in stored order, demoted last, dropped gone
    assert verdicts == {"meh": "demote", "bad": "drop"}
