"""In-batch + hard-negative contrastive loss with a false-negative margin mask (stage 1).

Idea (two-stage dual-encoder training for graded relevance; the masking rule is the one of
GISTEmbed / "positive-aware" hard-negative mining): InfoNCE over every candidate in the batch
(the other queries' positives and all mined hard negatives), where a candidate that the model
scores above the labelled positive by more than ``margin`` is treated as an unlabelled
near-duplicate of the positive (a false negative) and removed from the softmax instead of
being pushed away. Candidates scoring below that stay negatives, however close: they are the
hard negatives the loss is for. Candidates the labels themselves call relevant
(``known_positive``) are removed too. The share of masked candidates is returned, so training
can log how much the mask takes away.

Shapes:
    query     [B, D]  L2-normalised query embeddings
    positive  [B, D]  one labelled positive per query (row i belongs to query i)
    negatives [N, D]  hard negatives of the whole batch, shared by every query (may be N = 0)
    known_positive [B, B + N] bool, optional: candidate j is labelled relevant for query i
The target of query i is candidate i; it is never masked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


DEFAULT_MARGIN = 0.1


class ContrastiveLoss(NamedTuple):
    loss: torch.Tensor
    masked_share: float  # of the off-target candidates, the share removed by either mask


def false_negative_mask(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """[B, C] bool: candidate j (j != i) scores above ``positive score + margin`` for query i."""
    scores = scores.detach()  # the mask is a selection, not something to differentiate
    positive = scores.diagonal().unsqueeze(1)
    mask = scores > positive + margin
    mask.fill_diagonal_(False)
    return mask


def masked_contrastive_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    margin: float = DEFAULT_MARGIN,
    known_positive: torch.Tensor | None = None,
) -> ContrastiveLoss:
    """Mean cross-entropy of each query's positive against the unmasked candidates."""
    if query.shape != positive.shape:
        raise ValueError(f"query {tuple(query.shape)} and positive {tuple(positive.shape)} must match")
    candidates = positive if negatives is None or len(negatives) == 0 else torch.cat([positive, negatives])
    scores = query @ candidates.T  # [B, B + N]
    mask = false_negative_mask(scores, margin)
    if known_positive is not None:
        if known_positive.shape != scores.shape:
            raise ValueError(f"known_positive must be {tuple(scores.shape)}, got {tuple(known_positive.shape)}")
        mask |= known_positive & ~torch.eye(*scores.shape, dtype=torch.bool, device=scores.device)
    logits = (scores / temperature).masked_fill(mask, float("-inf"))
    off_target = scores.numel() - len(query)
    share = float(mask.sum()) / off_target if off_target else 0.0
    return ContrastiveLoss(F.cross_entropy(logits, torch.arange(len(query), device=query.device)), share)
