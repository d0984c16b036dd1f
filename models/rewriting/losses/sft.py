"""Supervised fine-tuning loss: the mean negative log-likelihood of the answer tokens given the
prompt (teacher forcing; prompt tokens are not scored).

This is stage 1 of the rewriting method (multi-instruction SFT on rejection-sampled rewrite
pairs mixed with auxiliary tasks), and in stage 3 it is the term that keeps the aligned model
generating fluent rewrites while the preference loss moves probability between candidates.
"""

from __future__ import annotations

from typing import Any

from tailbridge.models.rewriting.tokens import answer_logprobs


def sft_loss(model: Any, batch: dict[str, Any]) -> Any:
    logp, mask = answer_logprobs(model, batch)
    return -logp.sum() / mask.sum().clamp(min=1)
