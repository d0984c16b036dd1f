"""ROAR: a group Bradley-Terry objective with odds-ratio margins between consecutive grades (stage 2).

Idea (two-stage dual-encoder training for graded relevance): under Bradley-Terry with scores
``s / temperature``, the odds that item i is preferred to item j are ``exp((s_i - s_j) / T)``.
Within one query's group of judged items (exact > substitute > complement > irrelevant, any
subset of grades, any number per grade), every item must be preferred to every item of the
*next lower grade present in the group* with odds of at least ``min_odds_ratio``. The loss is
the hinge on the log odds ratio, averaged over those pairs, so it is exactly zero once
consecutive grades are separated by more than the margin, and grows linearly with any
violation (for example when two grades swap). Non-consecutive grades are ordered by
transitivity and add no terms.

Shapes:
    scores [B, G]  query-item similarities of each query's group (padded)
    grades [B, G]  integer grade per item, higher is more relevant
    valid  [B, G]  bool, False on padding
"""

from __future__ import annotations

import math

import torch


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
    """Mean hinge ``max(0, log(min_odds_ratio) - (s_i - s_j) / T)`` over consecutive-grade pairs."""
    if scores.shape != grades.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and grades {tuple(grades.shape)} must match")
    if min_odds_ratio < 1:
        raise ValueError("min_odds_ratio must be >= 1 (1 means: only the order matters)")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    pairs = consecutive_grade_pairs(grades.long(), valid)
    if not pairs.any():
        return scores.sum() * 0.0  # keeps the graph (and the device) for a batch without graded pairs
    log_odds = (scores.unsqueeze(2) - scores.unsqueeze(1)) / temperature  # [B, i, j]
    hinge = torch.relu(math.log(min_odds_ratio) - log_odds)
    return hinge[pairs].mean()
