"""Stage 1: multi-instruction supervised fine-tuning on the mined examples (``mining``)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from tailbridge.models.rewriting.generator import Generator
from tailbridge.models.rewriting.losses.sft import sft_loss
from tailbridge.models.rewriting.loop import Budget, optimise
from tailbridge.models.rewriting.mining import Example
from tailbridge.models.rewriting.prompts import prompt
from tailbridge.models.rewriting.tokens import encode


def train_sft(generator: Generator, examples: Sequence[Example], budget: Budget, batch_size: int = 8,
              lr: float = 1e-4, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``generator.model`` in place on shuffled epochs of ``examples``."""
    if not examples:
        raise ValueError("no training examples: nothing was mined from the data (see the mining counts)")
    order: list[int] = []
    rng = random.Random(seed)

    def step_loss(step: int) -> Any:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order.extend(rng.sample(range(len(examples)), len(examples)))
            batch.append(examples[order.pop()])
        enc = encode(generator.tokenizer, [prompt(e.task, e.query) for e in batch], [e.answer for e in batch],
                     generator.device)
        return sft_loss(generator.model, enc)

    return optimise(generator.model, step_loss, budget, lr, progress)
