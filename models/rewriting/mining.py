"""Stage 1 data: rewrite pairs mined from behaviour and judgements, kept by rejection sampling,
mixed with auxiliary tasks.

Rewrite pairs (``rewrite`` task): a long-tail query and a frequent query lead to the same
items when their relevant sets (``signals.QuerySignals.relevant``: well-graded or engaged)
overlap. For each tail query the frequent queries with the largest overlap (Jaccard) are
candidate rewrites, and a candidate is kept only if searching it (``search.ExactSearch``, the
handler's fused search) retrieves at least ``min_recall`` of the tail query's relevant items
in its top 100: rejection sampling on what the rewrite actually retrieves. A frequent query
is the target of at most ``per_target`` pairs (those with the best recall): a few broad
queries overlap many tail queries, and a short fine-tuning on pairs they dominate learns to
answer them for every query (the demo's 42-step SFT answered one puzzle query for most tail
queries).

Auxiliary tasks, on the same queries: ``category`` (the category path most of the query's
exact items share), ``keywords`` (the title words, brand removed, of its exact items' most
common title) and ``correct`` (a frequent query with a seeded typo -> the query).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tailbridge.models.rewriting.signals import QuerySignals


@dataclass(frozen=True)
class Example:
    task: str  # prompts.TASKS
    query: str
    answer: str


@dataclass(frozen=True)
class Pair:
    source: str  # the tail query
    rewrite: str  # the frequent query that leads to the same items
    overlap: float  # Jaccard of the two relevant sets
    recall: float  # of the source's relevant items, in the rewrite's top 100


@dataclass(frozen=True)
class MiningConfig:
    candidates: int = 5  # frequent queries tried per tail query, by overlap
    min_overlap: float = 0.2
    min_recall: float = 0.3
    per_query: int = 2  # pairs kept per tail query
    per_target: int = 8  # pairs kept per frequent query (rewrite text)
    aux_ratio: float = 1.0  # auxiliary examples per rewrite pair
    seed: int = 0


def _is_source(s: QuerySignals) -> bool:
    return s.stratum == "tail"


def _is_target(s: QuerySignals) -> bool:
    return s.stratum in ("head", "torso")


def mine_pairs(signals: Mapping[str, QuerySignals], search: Any, cfg: MiningConfig = MiningConfig()) -> list[Pair]:
    """Tail -> frequent query pairs that pass rejection sampling (see the module docstring)."""
    targets = {qid: s for qid, s in signals.items() if _is_target(s) and s.relevant}
    by_item: dict[str, list[str]] = {}
    for qid, s in targets.items():
        for item in s.relevant:
            by_item.setdefault(item, []).append(qid)
    proposals: list[tuple[QuerySignals, list[tuple[float, str]]]] = []
    for s in signals.values():
        rel = s.relevant
        if not _is_source(s) or not rel:
            continue
        shared = Counter(t for item in rel for t in by_item.get(item, ()))
        scored = sorted(((n / len(rel | targets[t].relevant), targets[t].text) for t, n in shared.items()),
                        key=lambda x: (-x[0], x[1]))
        kept = [(o, text) for o, text in scored if o >= cfg.min_overlap][:cfg.candidates]
        if kept:
            proposals.append((s, kept))
    ranked = search.ranked([[text] for _, kept in proposals for _, text in kept])
    pairs, cursor = [], 0
    for s, kept in proposals:
        rel, accepted = s.relevant, []
        for overlap, text in kept:
            recall = len(rel.intersection(ranked[cursor])) / len(rel)
            cursor += 1
            if recall >= cfg.min_recall:
                accepted.append(Pair(s.text, text, round(overlap, 4), round(recall, 4)))
        pairs += sorted(accepted, key=lambda p: (-p.recall, p.rewrite))[:cfg.per_query]
    uses: Counter[str] = Counter()
    capped = []
    for p in sorted(pairs, key=lambda p: (-p.recall, -p.overlap, p.source, p.rewrite)):
        uses[p.rewrite] += 1
        if uses[p.rewrite] <= cfg.per_target:
            capped.append(p)
    return capped


def _typo(text: str, rng: random.Random) -> str:
    """One character dropped, doubled or swapped with its neighbour, inside a word."""
    spots = [i for i in range(1, len(text) - 1) if text[i].isalpha() and text[i - 1].isalpha()]
    if not spots:
        return text
    i = rng.choice(spots)
    kind = rng.randrange(3)
    if kind == 0:
        return text[:i] + text[i + 1:]
    if kind == 1:
        return text[:i] + text[i] + text[i:]
    return text[:i - 1] + text[i] + text[i - 1] + text[i + 1:]


def auxiliary(signals: Mapping[str, QuerySignals], items: Mapping[str, Mapping[str, Any]],
              rng: random.Random) -> list[Example]:
    """The three auxiliary tasks over every query with exact items (and typos of frequent ones)."""
    out = []
    for s in signals.values():
        exact = [items[i] for i, g in s.judged.items() if g >= 3 and i in items]
        if not exact:
            continue
        paths = Counter(" > ".join(it["category_path"][-2:]) for it in exact if it.get("category_path"))
        if paths:
            out.append(Example("category", s.text, paths.most_common(1)[0][0]))
        titles = Counter(_title_words(it) for it in exact)
        words = titles.most_common(1)[0][0]
        if words:
            out.append(Example("keywords", s.text, words))
        if _is_target(s):
            typo = _typo(s.text, rng)
            if typo != s.text:
                out.append(Example("correct", typo, s.text))
    return out


def _title_words(item: Mapping[str, Any]) -> str:
    brand = set((item.get("brand") or "").lower().split())
    return " ".join(w for w in item["title"].split() if w.lower() not in brand).lower()


def build_examples(pairs: Sequence[Pair], aux: Sequence[Example], cfg: MiningConfig) -> list[Example]:
    """Every rewrite pair plus ``aux_ratio`` auxiliary examples per pair (an even draw over the
    auxiliary tasks), shuffled with the config's seed."""
    rng = random.Random(cfg.seed)
    examples = [Example("rewrite", p.source, p.rewrite) for p in pairs]
    by_task: dict[str, list[Example]] = {}
    for ex in aux:
        by_task.setdefault(ex.task, []).append(ex)
    want = int(round(cfg.aux_ratio * max(len(pairs), 1)))
    per_task = want // max(len(by_task), 1)
    for task in sorted(by_task):
        pool = by_task[task]
        examples += rng.sample(pool, min(per_task, len(pool)))
    rng.shuffle(examples)
    return examples
