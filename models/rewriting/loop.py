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


PROGRESS_EVERY_S = 60.0


def optimise(model: Any, step_loss: Callable[[int], Any], budget: Budget, lr: float,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """AdamW on ``step_loss(step)`` until the step or time budget ends; the losses of the first
    and last tenth of the steps say whether it learned. ``progress`` hears the step count and
    the recent loss about once a minute (a CPU run lasts tens of minutes)."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    started, losses = time.monotonic(), []
    reported = started
    while len(losses) < budget.max_steps and time.monotonic() - started < budget.max_seconds:
        loss = step_loss(len(losses))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        now = time.monotonic()
        if progress is not None and now - reported >= PROGRESS_EVERY_S:
            reported = now
            recent = losses[-50:]
            progress(f"  step {len(losses)} (at most {budget.max_steps}), {now - started:.0f} of "
                     f"{budget.max_seconds:.0f} s, loss {sum(recent) / len(recent):.4f} (last {len(recent)} steps)")
    model.eval()
    tenth = max(1, len(losses) // 10)
    return {"steps": len(losses), "seconds": round(time.monotonic() - started, 1),
            "loss_first": round(sum(losses[:tenth]) / tenth, 4) if losses else None,
            "loss_last": round(sum(losses[-tenth:]) / tenth, 4) if losses else None}
