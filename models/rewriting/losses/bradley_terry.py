"""Bradley-Terry preference loss over a partial order of candidate rewrites.

The idea (objective alignment of a query rewriter, as in Taobao's BEQUE): after offline
feedback has ordered the beam's candidates for a query by what they retrieve, the model should
give a better rewrite a higher score than a worse one. With the score of a candidate ``y`` for
query ``x`` taken as the model's length-normalised log-likelihood ``s(y) = mean log p(y | x)``
(as the PRO / rank-based alignment methods do), the Bradley-Terry model says
``P(y_w > y_l) = sigmoid(beta * (s(y_w) - s(y_l)))``; the loss is its negative log over every
pair (w, l) the partial order contains (pairs it leaves incomparable contribute nothing).
Stage 3 adds ``losses.sft`` on each query's best candidate, so the model keeps producing
fluent rewrites and cannot lower every likelihood to satisfy the differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tailbridge.models.rewriting.tokens import answer_logprobs


def sequence_scores(model: Any, batch: dict[str, Any]) -> Any:
    """s(y) for each row: the mean log-probability of its answer tokens."""
    logp, mask = answer_logprobs(model, batch)
    return logp.sum(-1) / mask.sum(-1).clamp(min=1)


def bradley_terry_loss(scores: Any, pairs: Sequence[tuple[int, int]], beta: float = 1.0) -> Any:
    """Mean of -log sigmoid(beta (s_w - s_l)) over (winner row, loser row) pairs."""
    import torch

    if not pairs:
        return scores.sum() * 0.0
    winners = torch.tensor([w for w, _ in pairs], device=scores.device)
    losers = torch.tensor([lo for _, lo in pairs], device=scores.device)
    return -torch.nn.functional.logsigmoid(beta * (scores[winners] - scores[losers])).mean()
