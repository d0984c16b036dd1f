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


def test_margin_mask_removes_exactly_the_near_duplicate():
    q = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    pos = unit([0.9, 0.1, 0.0], [0.0, 0.8, 0.6])
    dup_of_pos0 = pos[0:1].clone()  # a near-duplicate of query 0's positive, mined as a "negative"
    far = unit([0.0, 0.0, 1.0])
    negs = torch.cat([dup_of_pos0, far])
    s = (q @ torch.cat([pos, negs]).T).tolist()

    masked = masked_contrastive_loss(q, pos, negs, temperature=W, margin=0.05)
    # Query 0: the duplicate (same score as its positive) is dropped, nothing else is.
    expect0 = ce(s[0][0], [s[0][1], s[0][3]])
    # Query 1: the duplicate of query 0's positive scores far below query 1's positive: kept.
    expect1 = ce(s[1][1], [s[1][0], s[1][2], s[1][3]])
    assert masked.item() == pytest.approx((expect0 + expect1) / 2, rel=1e-5)

    unmasked = masked_contrastive_loss(q, pos, negs, temperature=W, margin=-10.0)
    assert unmasked.item() == pytest.approx((ce(s[0][0], [s[0][1], s[0][2], s[0][3]]) + expect1) / 2, rel=1e-5)
    assert unmasked > masked


def test_known_positive_mask_and_target_never_masked():
    q = unit([1.0, 0.0], [0.0, 1.0])
    pos = unit([1.0, 0.2], [0.3, 1.0])
    s = (q @ pos.T).tolist()
    known = torch.tensor([[False, True], [False, False]])  # query 0 is labelled relevant to query 1's positive
    loss = masked_contrastive_loss(q, pos, temperature=W, margin=-10.0, known_positive=known)
    assert loss.item() == pytest.approx((ce(s[0][0], []) + ce(s[1][1], [s[1][0]])) / 2, rel=1e-5)
    # A huge margin masks every other candidate, never the target: the loss is exactly 0.
    assert masked_contrastive_loss(q, pos, temperature=T, margin=10.0).item() == pytest.approx(0.0, abs=1e-6)


def test_contrastive_pulls_the_positive_and_pushes_the_negative():
    q = unit([1.0, 0.0, 0.0]).requires_grad_()
    pos, neg = unit([0.6, 0.8, 0.0]), unit([0.6, 0.0, 0.8])
    loss = masked_contrastive_loss(q, pos, neg, temperature=T, margin=-10.0)
    loss.backward()
    step = -q.grad[0]  # gradient descent direction
    assert step @ (pos[0] - neg[0]) > 0  # moves towards the positive, away from the negative
    better = masked_contrastive_loss(unit([0.6, 0.8, 0.0]), pos, neg, temperature=T, margin=-10.0)
    assert better < loss


def test_contrastive_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must match"):
        masked_contrastive_loss(torch.zeros(2, 3), torch.zeros(3, 3))


# ------------------------------------------------------------------ ROAR


def test_consecutive_pairs_skip_absent_grades_and_padding():
    grades = torch.tensor([[3, 1, 1, 0, 2]])
    valid = torch.tensor([[True, True, True, True, False]])  # the grade-2 item is padding
    pairs = consecutive_grade_pairs(grades, valid)[0]
    expected = {(0, 1), (0, 2), (1, 3), (2, 3)}  # 3 > 1 (2 absent), 1 > 0; never 3 > 0 directly
    assert {tuple(ij) for ij in pairs.nonzero().tolist()} == expected


def test_roar_is_zero_when_separated_and_grows_when_grades_swap():
    grades = torch.tensor([[3, 2, 1, 0]])
    r = 4.0  # log odds margin log(4) = 1.386, i.e. a score gap of 0.0693 at T = 0.05
    separated = torch.tensor([[0.9, 0.7, 0.5, 0.3]])
    assert roar_loss(separated, grades, temperature=T, min_odds_ratio=r).item() == 0.0
    swapped = torch.tensor([[0.7, 0.9, 0.5, 0.3]])  # exact and substitute swap
    loss = roar_loss(swapped, grades, temperature=T, min_odds_ratio=r)
    # Only the (3, 2) pair is violated: hinge = log 4 + 0.2 / T, averaged over 3 pairs.
    assert loss.item() == pytest.approx((math.log(r) + 0.2 / T) / 3, rel=1e-5)
    worse = roar_loss(torch.tensor([[0.5, 0.9, 0.7, 0.3]]), grades, temperature=T, min_odds_ratio=r)
    assert worse > loss


def test_roar_margin_counts_inside_the_odds_ratio():
    grades = torch.tensor([[3, 2]])
    close = torch.tensor([[0.52, 0.50]])  # right order, but odds exp(0.4) < 4
    assert roar_loss(close, grades, temperature=T, min_odds_ratio=4.0).item() == pytest.approx(math.log(4) - 0.4, rel=1e-5)
    assert roar_loss(close, grades, temperature=T, min_odds_ratio=1.0).item() == 0.0


def test_roar_gradient_raises_higher_grade_and_lowers_lower_grade():
    scores = torch.tensor([[0.5, 0.6]], requires_grad=True)
    roar_loss(scores, torch.tensor([[3, 1]]), temperature=T).backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]


def test_roar_handles_variable_group_sizes_with_padding():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.5]])
    grades = torch.tensor([[3, 0, 0], [3, 0, 1]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    # Row 0: (3,0) fine. Row 1: 3 > 1 violated by 0.3, 1 > 0 violated by 0.3.
    expected = (0.0 + (math.log(4) + 0.3 / T) + (math.log(4) + 0.3 / T)) / 3
    assert roar_loss(scores, grades, valid, temperature=T).item() == pytest.approx(expected, rel=1e-5)
    assert roar_loss(scores[:, :1], grades[:, :1], temperature=T).item() == 0.0  # one grade: no pairs


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
