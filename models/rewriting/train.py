"""``tailbridge train rewriter``: the three stages, each ending in (or feeding) a version.

1. SFT: mine pairs (``mining``, rejection sampling with ``search``), mix in the auxiliary
   tasks, fine-tune the base model (``sft``) -> version ``<name>-sft``.
2. Offline feedback: beam candidates for training tail queries, scored and ordered (``feedback``).
3. Alignment: Bradley-Terry over the orders + SFT term (``align``) -> version ``<name>-aligned``
   whose parent is the SFT version.

Both versions are judged on the same held-out dev queries (tail queries of the training split
that no stage trains on) by the mean relevance, increment and hit rate of their first rewrite;
an aligned version that is worse than its parent on increment + hit rate is still written, and
its record and the command say so. A finished SFT version with the same fingerprint (data,
feedback, settings) is reused, so a second run goes straight to stages 2 and 3.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tailbridge.models.data.loaders import load_dataset
from tailbridge.models.rewriting import feedback as stage2
from tailbridge.models.rewriting.align import train_alignment
from tailbridge.models.rewriting.generator import Generator
from tailbridge.models.rewriting.loop import Budget
from tailbridge.models.rewriting.mining import MiningConfig, auxiliary, build_examples, mine_pairs
from tailbridge.models.rewriting.sft import train_sft
from tailbridge.models.rewriting.signals import QuerySignals, engaged_by_text, query_signals
from tailbridge.models.rewriting.versions import load_version, read_record, save_version

STAGES = ("sft", "align")


@dataclass(frozen=True)
class RewriterConfig:
    budget_minutes: float = 10.0  # both training stages together (stage 2 generation included)
    sft_share: float = 0.6  # of the budget
    sft_steps: int = 2000
    align_steps: int = 400
    align_epochs: float = 2.0  # passes over the ordered groups (steps = the smaller bound)
    batch_size: int = 8
    sft_lr: float = 1e-4
    align_lr: float = 2e-5
    beta: float = 2.0
    sft_weight: float = 0.5
    feedback_queries: int = 320  # stage 2 queries (training tail queries; ~7 s per 16 on 2 idle cores)
    candidates: int = 4  # beam width = candidates per query
    dev_fraction: float = 0.1
    dev_queries: int = 32
    dev_beams: int = 1  # greedy: the dev check runs three times per training
    mining: MiningConfig = field(default_factory=MiningConfig)
    seed: int = 0


@dataclass
class Prepared:
    name: str
    signals: dict[str, QuerySignals]
    train_qids: list[str]  # judged training queries the stages may learn from
    dev_qids: list[str]  # held-out tail queries of the training split
    items: dict[str, dict]
    fingerprint: str
    data: dict[str, Any]


def _in_dev(qid: str, fraction: float) -> bool:
    return zlib.crc32(qid.encode()) % 1000 < fraction * 1000


def prepare(data_dir: Path, feedback_dir: Path | None, cfg: RewriterConfig, base_name: str) -> Prepared:
    from tailbridge.models.data.feedback import read_feedback

    data = load_dataset(data_dir)
    log = read_feedback(feedback_dir) if feedback_dir is not None and (feedback_dir / "examples").is_dir() else None
    signals = query_signals(data.queries, data.split("train"), data.strata, engaged_by_text(log))
    dev = sorted(q for q, s in signals.items() if s.stratum == "tail" and _in_dev(q, cfg.dev_fraction))[:cfg.dev_queries]
    held = {q for q in signals if _in_dev(q, cfg.dev_fraction) and signals[q].stratum == "tail"}
    train_qids = sorted(q for q in signals if q not in held)
    described = {"dir": str(data_dir), "name": data.name, "queries": len(signals), "items": len(data.items),
                 "feedback": str(feedback_dir) if log is not None else None,
                 "feedback_rows": 0 if log is None else len(log)}
    raw = json.dumps([described, asdict(cfg) | {"budget_minutes": None}, base_name], sort_keys=True, default=str)
    return Prepared(data.name, signals, train_qids, dev, data.items, hashlib.sha256(raw.encode()).hexdigest()[:10],
                    described)


def dev_metrics(generator: Generator, prep: Prepared, search: Any, beams: int) -> dict[str, float]:
    """Mean scores of each dev query's first rewrite (a query without one scores 0) and the
    share of dev queries that got one."""
    texts = [prep.signals[q].text for q in prep.dev_qids]
    first = [r[:1] for r in generator.rewrite(texts, n=1, beams=beams)]
    base = search.ranked([[t] for t in texts])
    got = [(q, b, r[0]) for q, b, r in zip(prep.dev_qids, base, first) if r]
    retrieved = search.ranked([[r] for _, _, r in got])
    scored = [stage2.score(prep.signals[q], b, hits, r) for (q, b, r), hits in zip(got, retrieved)]
    scored += [stage2.Scored("", 0.0, 0.0, 0.0)] * (len(texts) - len(got))
    return stage2.mean_scores(scored) | {"with_rewrite": round(len(got) / max(len(texts), 1), 4),
                                          "queries": len(texts)}


def train(data_dir: Path, root: Path, base: Callable[[], Generator], search: Any, feedback_dir: Path | None = None,
          cfg: RewriterConfig = RewriterConfig(), name: str | None = None, stages: Sequence[str] = STAGES,
          base_name: str = "smollm2-135m-instruct", say: Callable[[str], None] = print) -> list[str]:
    """Run the requested stages; returns the versions written or reused, in order."""
    import torch

    torch.manual_seed(cfg.seed)
    started = time.monotonic()
    budget_s = cfg.budget_minutes * 60
    prep = prepare(Path(data_dir), feedback_dir, cfg, base_name)
    name = name or f"{prep.name}-{prep.fingerprint}"
    sft_version, aligned_version = f"{name}-sft", f"{name}-aligned"
    say(f"{prep.name}: {len(prep.signals)} judged training queries, {len(prep.dev_qids)} held-out dev tail queries"
        + (f", feedback log {prep.data['feedback_rows']} rows" if prep.data["feedback"] else ", no feedback log"))
    settings = asdict(cfg)
    out: list[str] = []

    record = read_record(root, sft_version)
    if "sft" in stages and (record is None or record["data"].get("fingerprint") != prep.fingerprint):
        train_signals = {q: prep.signals[q] for q in prep.train_qids}
        pairs = mine_pairs(train_signals, search, cfg.mining)
        aux = auxiliary(train_signals, prep.items, random.Random(cfg.seed))
        examples = build_examples(pairs, aux, cfg.mining)
        say(f"stage 1 data: {len(pairs)} rewrite pairs kept by rejection sampling, {len(aux)} auxiliary "
            f"candidates, {len(examples)} training examples")
        generator = base()
        before = dev_metrics(generator, prep, search, cfg.dev_beams)
        stats = train_sft(generator, examples, Budget(cfg.sft_steps, budget_s * cfg.sft_share), cfg.batch_size,
                          cfg.sft_lr, cfg.seed, say)
        after = dev_metrics(generator, prep, search, cfg.dev_beams)
        say(f"stage 1: {stats['steps']} steps in {stats['seconds']} s, loss {stats['loss_first']} -> "
            f"{stats['loss_last']}; dev {after} (base model: {before})")
        save_version(generator, root, sft_version, {
            "stage": "sft", "parent": base_name, "data": prep.data | {"fingerprint": prep.fingerprint},
            "metrics": {"dev": after, "dev_parent": before, "training": stats,
                        "mined": {"pairs": len(pairs), "auxiliary": len(aux), "examples": len(examples)}},
            "settings": settings})
        say(f"wrote rewriter version {sft_version}")
    elif "sft" in stages:
        say(f"rewriter version {sft_version} is already trained on this data and settings: reused")
    out.append(sft_version)
    if "align" not in stages:
        return out

    if read_record(root, sft_version) is None:
        raise ValueError(f"stage 3 needs the SFT version {sft_version}: run stage sft first")
    generator = load_version(root, sft_version)
    rng = random.Random(cfg.seed)
    tail = [q for q in prep.train_qids if prep.signals[q].stratum == "tail"]
    chosen = sorted(rng.sample(tail, min(cfg.feedback_queries, len(tail))))
    t0 = time.monotonic()
    groups = stage2.collect(generator, prep.signals, chosen, search, cfg.candidates)
    feedback_s = round(time.monotonic() - t0, 1)
    pair_count = sum(len(g.pairs) for g in groups)
    say(f"stage 2: {len(chosen)} queries x {cfg.candidates} beam candidates in {feedback_s} s; "
        f"{len(groups)} with a partial order ({pair_count} ordered pairs)")
    if not groups:
        say("stage 3 skipped: no query's candidates differ in what they retrieve (nothing to prefer); "
            f"{sft_version} stays the newest version")
        return out
    left = max(budget_s - (time.monotonic() - started), 30.0)
    align_version(generator, groups, prep, root, sft_version, aligned_version, cfg, search, left,
                  {"queries": len(chosen), "groups": len(groups), "pairs": pair_count, "seconds": feedback_s}, say)
    out.append(aligned_version)
    return out


def align_version(generator: Generator, groups: Sequence[stage2.Group], prep: Prepared, root: Path, parent_version: str,
                  version: str, cfg: RewriterConfig, search: Any, seconds: float, feedback_info: dict[str, Any],
                  say: Callable[[str], None] = print, out_root: Path | None = None) -> dict[str, Any]:
    """Stage 3 on ``groups`` from the parent's generator, judged on the dev queries against the
    parent; writes ``version`` under ``out_root`` (default ``root``, where the parent is; the
    alignment loop builds under its staging dir), said and recorded when it is worse than the
    parent."""
    parent = read_record(root, parent_version)
    if parent is None:
        raise ValueError(f"stage 3 needs the parent version {parent_version}")
    stats = train_alignment(generator, groups, Budget(cfg.align_steps, seconds), cfg.beta, cfg.sft_weight,
                            lr=cfg.align_lr, seed=cfg.seed, epochs=cfg.align_epochs, progress=say)
    after = dev_metrics(generator, prep, search, cfg.dev_beams)
    before = parent["metrics"]["dev"]
    worse = after["increment"] + after["hit_rate"] < before["increment"] + before["hit_rate"]
    say(f"stage 3: {stats['steps']} steps in {stats['seconds']} s, loss {stats['loss_first']} -> "
        f"{stats['loss_last']}; dev {after} (parent {before})")
    if worse:
        say(f"warning: the aligned model is WORSE than its parent {parent_version} on dev increment + hit rate")
    record = {"stage": "aligned", "parent": parent_version, "data": prep.data | {"fingerprint": prep.fingerprint},
              "metrics": {"dev": after, "dev_parent": before, "worse_than_parent": worse, "training": stats,
                          "feedback": feedback_info},
              "settings": asdict(cfg)}
    save_version(generator, out_root or root, version, record)
    say(f"wrote rewriter version {version}")
    return record
