"""The retriever's losses on hand-built tensors: each test fails on a wrong sign or a missing mask."""

import math

import pytest
import torch
import torch.nn.functional as F

from tailbridge.models.retrieval.losses import masked_contrastive_loss, multi_grained_loss, roar_loss
from tailbridge.models.retrieval.losses.roar import consecutive_grade_pairs

torch.set_num_threads(1)
T = 0.05  # the default temperature: the ROAR margin tests use it
W = 0.5  # a warm temperature, so softmax terms stay far from float32 round-off


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def ce(target: float, others: list[float], t: float = W) -> float:
    """-log softmax of the target score among target + others, at temperature t."""
    logits = [target / t] + [o / t for o in others]
    return -(target / t - math.log(sum(math.exp(x) for x in logits)))


# ------------------------------------------------------------------ contrastive


def test_margin_mask_removes_only_candidates_above_the_positive_by_more_than_the_margin():
    q = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    pos = unit([0.8, 0.6, 0.0], [0.0, 0.8, 0.6])
    above = unit([1.0, 0.05, 0.0])  # scores 0.999 for query 0: above its positive (0.8) by 0.199
    close = unit([0.75, 0.0, 0.66])  # scores 0.75 for query 0: close below its positive, a hard negative
    negs = torch.cat([above, close])
    s = (q @ torch.cat([pos, negs]).T).tolist()
    assert s[0][2] - s[0][0] > 0.1 and 0 < s[0][0] - s[0][3] < 0.1

    masked = masked_contrastive_loss(q, pos, negs, temperature=W, margin=0.1)
    # Query 0: only the candidate above its positive by more than 0.1 is dropped; the close one stays.
    expect0 = ce(s[0][0], [s[0][1], s[0][3]])
    # Query 1: its positive (0.8) is above every other candidate: nothing is masked.
    expect1 = ce(s[1][1], [s[1][0], s[1][2], s[1][3]])
    assert masked.loss.item() == pytest.approx((expect0 + expect1) / 2, rel=1e-5)
    assert masked.masked_share == pytest.approx(1 / 6)  # 1 of 2 x 3 off-target candidates

    wide = masked_contrastive_loss(q, pos, negs, temperature=W, margin=0.3)  # 0.199 < 0.3: kept
    assert wide.masked_share == 0.0
    assert wide.loss.item() == pytest.approx((ce(s[0][0], [s[0][1], s[0][2], s[0][3]]) + expect1) / 2, rel=1e-5)
    assert wide.loss > masked.loss


def test_default_margin_is_not_zero():
    import inspect

    margin = inspect.signature(masked_contrastive_loss).parameters["margin"].default
    assert margin > 0


def test_known_positive_mask_and_target_never_masked():
    q = unit([1.0, 0.0], [0.0, 1.0])
    pos = unit([1.0, 0.2], [0.3, 1.0])
    s = (q @ pos.T).tolist()
    known = torch.tensor([[False, True], [False, False]])  # query 0 is labelled relevant to query 1's positive
    out = masked_contrastive_loss(q, pos, temperature=W, margin=10.0, known_positive=known)
    assert out.loss.item() == pytest.approx((ce(s[0][0], []) + ce(s[1][1], [s[1][0]])) / 2, rel=1e-5)
    assert out.masked_share == 0.5
    # A very negative margin masks every other candidate, never the target: the loss is exactly 0.
    assert masked_contrastive_loss(q, pos, temperature=T, margin=-10.0).loss.item() == pytest.approx(0.0, abs=1e-6)


def test_contrastive_pulls_the_positive_and_pushes_the_negative():
    q = unit([1.0, 0.0, 0.0]).requires_grad_()
    pos, neg = unit([0.6, 0.8, 0.0]), unit([0.6, 0.0, 0.8])
    loss = masked_contrastive_loss(q, pos, neg, temperature=T).loss
    loss.backward()
    step = -q.grad[0]  # gradient descent direction
    assert step @ (pos[0] - neg[0]) > 0  # moves towards the positive, away from the negative
    better = masked_contrastive_loss(unit([0.6, 0.8, 0.0]), pos, neg, temperature=T).loss
    assert better < loss


def test_contrastive_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must match"):
        masked_contrastive_loss(torch.zeros(2, 3), torch.zeros(3, 3))


# ------------------------------------------------------------------ ROAR


def bt_nll(s_hi: float, s_lo: float, m: float = 4.0, t: float = T) -> float:
    """-log P(hi preferred with odds ratio m) = -log(pi_hi / (pi_hi + m pi_lo)), pi = exp(s / t)."""
    pi_hi, pi_lo = math.exp(s_hi / t), math.exp(s_lo / t)
    return -math.log(pi_hi / (pi_hi + m * pi_lo))


def test_consecutive_pairs_skip_absent_grades_and_padding():
    grades = torch.tensor([[3, 1, 1, 0, 2]])
    valid = torch.tensor([[True, True, True, True, False]])  # the grade-2 item is padding
    pairs = consecutive_grade_pairs(grades, valid)[0]
    expected = {(0, 1), (0, 2), (1, 3), (2, 3)}  # 3 > 1 (2 absent), 1 > 0; never 3 > 0 directly
    assert {tuple(ij) for ij in pairs.nonzero().tolist()} == expected


def test_roar_is_the_bradley_terry_likelihood_with_an_odds_ratio_margin():
    grades = torch.tensor([[3, 2, 1, 0]])
    scores = torch.tensor([[0.9, 0.7, 0.72, 0.3]])
    # Three blocks, one pair each: (3 vs 2), (2 vs 1: inverted), (1 vs 0).
    expected = (bt_nll(0.9, 0.7) + bt_nll(0.7, 0.72) + bt_nll(0.72, 0.3)) / 3
    assert roar_loss(scores, grades, temperature=T, min_odds_ratio=4.0).item() == pytest.approx(expected, rel=1e-5)
    # Not a hinge: well separated grades still give a (small) positive loss; m = 1 is plain Bradley-Terry.
    assert 0 < roar_loss(torch.tensor([[0.9, 0.7, 0.5, 0.3]]), grades, temperature=T).item() < 0.1
    close = torch.tensor([[0.52, 0.50]])
    assert roar_loss(close, torch.tensor([[3, 2]]), temperature=T, min_odds_ratio=1.0).item() == \
        pytest.approx(bt_nll(0.52, 0.50, m=1.0), rel=1e-5)
    assert roar_loss(close, torch.tensor([[3, 2]]), temperature=T, min_odds_ratio=4.0).item() == \
        pytest.approx(math.log(1 + 4 * math.exp(-0.4)), rel=1e-5)


def test_roar_weighs_blocks_and_queries_equally_whatever_their_size():
    # Query 0: one exact item over four complements (one block of 4 pairs) and the complements
    # over one irrelevant item (a block of 4 pairs); query 1: a single pair, padded.
    scores = torch.tensor([[0.8, 0.5, 0.6, 0.7, 0.4, 0.1], [0.3, 0.6, 0, 0, 0, 0]])
    grades = torch.tensor([[3, 1, 1, 1, 1, 0], [2, 0, 0, 0, 0, 0]])
    valid = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    block_3_1 = sum(bt_nll(0.8, c) for c in (0.5, 0.6, 0.7, 0.4)) / 4
    block_1_0 = sum(bt_nll(c, 0.1) for c in (0.5, 0.6, 0.7, 0.4)) / 4
    query0, query1 = (block_3_1 + block_1_0) / 2, bt_nll(0.3, 0.6)
    loss = roar_loss(scores, grades, valid, temperature=T)
    assert loss.item() == pytest.approx((query0 + query1) / 2, rel=1e-5)
    assert roar_loss(scores[:, :1], grades[:, :1], temperature=T).item() == 0.0  # one grade: no pairs


def test_roar_gradient_raises_higher_grade_and_lowers_lower_grade():
    scores = torch.tensor([[0.5, 0.6]], requires_grad=True)
    roar_loss(scores, torch.tensor([[3, 1]]), temperature=T).backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]


# ------------------------------------------------------------------ multi-grained


def test_multi_grained_retrieval_is_a_softmax_against_random_items():
    scores = torch.tensor([[0.8, 0.2]])
    levels = torch.tensor([[3, 0]])  # purchased, shown-unclicked
    valid = torch.ones_like(levels, dtype=torch.bool)
    rnd = torch.tensor([[0.1, 0.3, 0.0]])
    out = multi_grained_loss(scores, levels, valid, rnd, engaged_level=1, temperature=W, rank_temperature=W)
    assert out.retrieval.item() == pytest.approx(ce(0.8, [0.1, 0.3, 0.0]), rel=1e-5)
    # Ranking pairs: purchased > unclicked, purchased > each random, unclicked > each random.
    diffs = [0.6, 0.7, 0.5, 0.8, 0.1, -0.1, 0.2]
    expected = sum(math.log1p(math.exp(-d / W)) for d in diffs) / len(diffs)
    assert out.ranking.item() == pytest.approx(expected, rel=1e-4)
    assert out.total.item() == pytest.approx(out.retrieval.item() + out.ranking.item(), rel=1e-6)


def test_multi_grained_ranking_penalises_inverted_levels():
    levels = torch.tensor([[3, 2, 1, 0]])
    valid = torch.ones_like(levels, dtype=torch.bool)
    rnd = torch.tensor([[-0.5, -0.6]])
    ordered = multi_grained_loss(torch.tensor([[0.9, 0.6, 0.3, 0.0]]), levels, valid, rnd, temperature=T)
    inverted = multi_grained_loss(torch.tensor([[0.0, 0.3, 0.6, 0.9]]), levels, valid, rnd, temperature=T)
    assert inverted.ranking > 10 * ordered.ranking
    assert inverted.retrieval > ordered.retrieval  # the engaged items score lower against the randoms


def test_multi_grained_gradient_signs_and_padding():
    scores = torch.tensor([[0.3, 0.5, 9.0]], requires_grad=True)
    levels = torch.tensor([[2, 0, 0]])
    valid = torch.tensor([[True, True, False]])  # the huge padded score must not matter
    out = multi_grained_loss(scores, levels, valid, torch.tensor([[0.1]]), temperature=T)
    out.total.backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]  # raise the clicked, lower the unclicked
    assert scores.grad[0, 2] == 0
