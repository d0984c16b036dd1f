"""Multi-grained loss from multi-stage behaviour: a global retrieval loss plus a local ranking loss.

Idea (multi-grained learning from multi-stage user behaviour): one query has items at several
levels -- purchased > added to cart > clicked > shown but not clicked -- and the catalog at
large ("random" items) sits below them all. Two objectives see the same similarities:

* retrieval (global): each engaged item (level >= ``engaged_level``) against many random
  catalog items, a sampled softmax: retrieval must find it among everything;
* ranking (local): within the query's own group plus the random items, every higher-level item
  above every lower-level one (Bradley-Terry / logistic pairs): the shown-but-unclicked items
  are the hard, in-context negatives that the global loss never sees.

The similarities these losses act on are the retriever's *post-fused* scores: the towers give a
weighted sum of per-granularity cosine similarities (semantic, lexical, behavioural), see
``models.retrieval.model``, so both losses also learn how to weigh the granularities.

Shapes:
    scores        [B, G]  similarities of each query to its group items (padded)
    levels        [B, G]  integer behaviour level, higher is better (random items are below all)
    valid         [B, G]  bool, False on padding
    random_scores [B, R]  similarities of each query to R random catalog items
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MultiGrainedLoss(NamedTuple):
    total: torch.Tensor
    retrieval: torch.Tensor
    ranking: torch.Tensor


def multi_grained_loss(
    scores: torch.Tensor,
    levels: torch.Tensor,
    valid: torch.Tensor,
    random_scores: torch.Tensor,
    *,
    engaged_level: int = 1,
    temperature: float = 0.05,
    rank_temperature: float = 0.1,
    rank_weight: float = 1.0,
) -> MultiGrainedLoss:
    if scores.shape != levels.shape or scores.shape != valid.shape or random_scores.shape[0] != scores.shape[0]:
        raise ValueError("scores, levels, valid must be [B, G] and random_scores [B, R]")
    zero = scores.sum() * 0.0

    # Global: engaged item vs the random items, log-softmax over [item, randoms].
    engaged = valid & (levels >= engaged_level)
    if engaged.any() and random_scores.shape[1] > 0:
        pos = scores.unsqueeze(2) / temperature  # [B, G, 1]
        rnd = (random_scores / temperature).unsqueeze(1).expand(-1, scores.shape[1], -1)  # [B, G, R]
        log_prob = pos.squeeze(2) - torch.logsumexp(torch.cat([pos, rnd], dim=2), dim=2)
        retrieval = -log_prob[engaged].mean()
    else:
        retrieval = zero

    # Local: order the levels; random items form the lowest level of every group.
    lowest = levels.masked_fill(~valid, 0).min() if valid.any() else levels.new_tensor(0)
    all_scores = torch.cat([scores, random_scores], dim=1)
    all_levels = torch.cat([levels, (lowest - 1).expand_as(random_scores).to(levels.dtype)], dim=1)
    all_valid = torch.cat([valid, torch.ones_like(random_scores, dtype=torch.bool)], dim=1)
    higher = (all_levels.unsqueeze(2) > all_levels.unsqueeze(1)) & all_valid.unsqueeze(2) & all_valid.unsqueeze(1)
    if higher.any():
        diff = (all_scores.unsqueeze(2) - all_scores.unsqueeze(1)) / rank_temperature  # [B, i, j]: s_i - s_j
        ranking = F.softplus(-diff)[higher].mean()
    else:
        ranking = zero
    return MultiGrainedLoss(retrieval + rank_weight * ranking, retrieval, ranking)
