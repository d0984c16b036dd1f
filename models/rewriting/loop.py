"""The optimisation loop both training stages share, bounded by steps and by wall time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    max_steps: int
    max_seconds: float


def optimise(model: Any, step_loss: Callable[[int], Any], budget: Budget, lr: float) -> dict[str, Any]:
    """AdamW on ``step_loss(step)`` until the step or time budget ends; the losses of the first
    and last tenth of the steps say whether it learned."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    started, losses = time.monotonic(), []
    while len(losses) < budget.max_steps and time.monotonic() - started < budget.max_seconds:
        loss = step_loss(len(losses))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    tenth = max(1, len(losses) // 10)
    return {"steps": len(losses), "seconds": round(time.monotonic() - started, 1),
            "loss_first": round(sum(losses[:tenth]) / tenth, 4) if losses else None,
            "loss_last": round(sum(losses[-tenth:]) / tenth, 4) if losses else None}
