"""ROAR: a Bradley-Terry likelihood over graded groups with odds-ratio margins between consecutive
grades (stage 2).

Idea (two-stage dual-encoder training for graded relevance): a query's judged items fall into
groups by grade (exact > substitute > complement > irrelevant; any subset of grades, any number
of items per grade). Under Bradley-Terry with strengths ``pi = exp(s / T)``, the probability
that item i is preferred to item j *by an odds ratio of at least m* is

    P_m(i > j) = pi_i / (pi_i + m * pi_j) = sigmoid((s_i - s_j) / T - log m).

For every pair of *consecutive* grade groups present in the query (higher group H, the next
lower group L; non-consecutive grades follow by transitivity) the loss is the negative
log-likelihood ``-log P_m(i > j)`` averaged over the |H| x |L| pairs of that block; blocks are
averaged within the query and queries averaged in the batch. So a query with 30 complements
and one exact item weighs as much as any other query, and inside it a big group does not drown
a small one. The margin sits inside the likelihood (an odds ratio), not as a hinge: the loss
keeps a small, shrinking gradient once the margin is met.

Shapes:
    scores [B, G]  query-item similarities of each query's group (padded)
    grades [B, G]  integer grade per item, higher is more relevant
    valid  [B, G]  bool, False on padding
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def consecutive_grade_pairs(grades: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, G, G] bool: (i, j) where grade_j is the highest grade present in the group below grade_i."""
    big = torch.iinfo(grades.dtype).min
    g = grades.masked_fill(~valid, big)
    lower = g.unsqueeze(1) < g.unsqueeze(2)  # [B, i, j]: grade_j < grade_i
    # The next lower grade for item i: the max over valid j with a lower grade.
    next_lower = torch.where(lower, g.unsqueeze(1).expand_as(lower), big).amax(dim=2)  # [B, G]
    pairs = lower & (g.unsqueeze(1) == next_lower.unsqueeze(2))
    return pairs & valid.unsqueeze(2) & valid.unsqueeze(1)


def roar_loss(
    scores: torch.Tensor,
    grades: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    min_odds_ratio: float = 4.0,
) -> torch.Tensor:
    """Mean over queries of the mean over consecutive-grade blocks of the mean pair NLL."""
    if scores.shape != grades.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and grades {tuple(grades.shape)} must match")
    if min_odds_ratio < 1:
        raise ValueError("min_odds_ratio must be >= 1 (1 means: only the order matters)")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    grades = grades.long()
    pairs = consecutive_grade_pairs(grades, valid)  # [B, i, j]
    if not pairs.any():
        return scores.sum() * 0.0  # keeps the graph (and the device) for a batch without graded pairs
    nll = F.softplus(math.log(min_odds_ratio) - (scores.unsqueeze(2) - scores.unsqueeze(1)) / temperature)
    # A block is identified by the higher item's grade: all its pairs go to the next lower grade.
    levels = torch.unique(grades[valid])
    block_of = (grades.unsqueeze(-1) == levels).float()  # [B, G, K]: item i has grade level k
    pair_w = pairs.float()
    block_sum = torch.einsum("bij,bik->bk", nll * pair_w, block_of)  # [B, K]
    block_n = torch.einsum("bij,bik->bk", pair_w, block_of)
    has = block_n > 0
    block_mean = torch.where(has, block_sum / block_n.clamp(min=1), 0.0)
    per_query_blocks = has.sum(1)
    query_loss = block_mean.sum(1) / per_query_blocks.clamp(min=1)
    counted = per_query_blocks > 0
    return query_loss[counted].mean()
