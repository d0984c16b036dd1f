"""The promotion gate: is a candidate model version at least as good as the serving one?

Both are scored on the same evidence, never on what either trained on:

* offline replay of a held-out recent slice of the feedback log: each logged search's served
  page is re-ranked by the model (interleaving-free: the logged outcomes stay fixed, only the
  order changes) and scored with nDCG@10 against what the shopper did there: ``purchase``
  (gain 1 for a purchased item, over pages with a purchase), ``cart`` (carted or bought),
  ``click`` (any engagement) and ``graded`` (clicked 1, carted 2, purchased 3);
* the judged test split where the data has one (``judged_ndcg@10``).

``decide`` promotes when no compared metric is worse than the serving version's by more than
the tolerance (absolute nDCG), and when there is enough evidence (pages with a purchase).
Everything here is pure: the callers (the alignment loop) produce the scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tailbridge.models.metrics import ndcg_at

# Name -> the least gain level (0 shown, 1 clicked, 2 carted, 3 purchased) that counts as a hit.
REPLAY_METRICS = {"purchase": 3, "cart": 2, "click": 1}


@dataclass(frozen=True)
class Page:
    """One logged search: per served item its model score, logged position and gain level."""

    scores: Sequence[float]
    positions: Sequence[int]
    gains: Sequence[int]  # 0 shown_unclicked, 1 clicked, 2 added_to_cart, 3 purchased


def replay_ndcg(pages: Iterable[Page], k: int = 10) -> dict[str, Any]:
    """Mean nDCG@k of re-ranking each page by its scores (higher first, ties by logged position)
    for each outcome, and how many pages had that outcome (pages without one say nothing)."""
    sums = {name: 0.0 for name in (*REPLAY_METRICS, "graded")}
    counts = dict.fromkeys(sums, 0)
    for page in pages:
        order = sorted(range(len(page.scores)), key=lambda i: (-page.scores[i], page.positions[i]))
        ranked = [str(i) for i in order]
        for name, least in REPLAY_METRICS.items():
            judged = {str(i): int(g >= least) for i, g in enumerate(page.gains)}
            if any(judged.values()):
                sums[name] += ndcg_at(ranked, judged, k)
                counts[name] += 1
        graded = {str(i): int(g) for i, g in enumerate(page.gains)}
        if any(graded.values()):
            sums["graded"] += ndcg_at(ranked, graded, k)
            counts["graded"] += 1
    out: dict[str, Any] = {f"{name}_ndcg@{k}": (sums[name] / counts[name] if counts[name] else None) for name in sums}
    out |= {f"pages_{name}": counts[name] for name in sums}
    return out


@dataclass
class GateResult:
    promote: bool
    reason: str
    candidate: dict[str, float | None]
    serving: dict[str, float | None] | None
    deltas: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0
    evidence: dict[str, Any] = field(default_factory=dict)  # the slice: pages, time span, split

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(candidate: Mapping[str, float | None], serving: Mapping[str, float | None] | None, tolerance: float,
           metrics: Sequence[str], min_pages: int = 0, pages: int | None = None,
           evidence: Mapping[str, Any] | None = None) -> GateResult:
    """Promote ``candidate`` over ``serving`` unless a compared metric fell by more than
    ``tolerance``, or the slice has fewer than ``min_pages`` pages of evidence (``pages``).
    With nothing serving, a candidate is promoted (there is nothing to be worse than). A
    metric missing on either side (no such pages, no judged split) is not compared."""
    cand = {m: candidate.get(m) for m in metrics}
    result = GateResult(False, "", cand, None if serving is None else {m: serving.get(m) for m in metrics},
                        tolerance=tolerance, evidence=dict(evidence or {}))
    if serving is None:
        result.promote, result.reason = True, "nothing serving"
        return result
    if pages is not None and pages < min_pages:
        result.reason = f"not enough evidence: {pages} pages < {min_pages}"
        return result
    for m in metrics:
        if cand[m] is not None and result.serving[m] is not None:
            result.deltas[m] = round(cand[m] - result.serving[m], 6)
    if not result.deltas:
        result.reason = "no metric to compare"
        return result
    worse = {m: d for m, d in result.deltas.items() if d < -tolerance}
    if worse:
        result.reason = "worse: " + ", ".join(f"{m} {d:+.4f}" for m, d in worse.items())
    else:
        result.promote = True
        result.reason = "not worse: " + ", ".join(f"{m} {d:+.4f}" for m, d in result.deltas.items())
    return result
