"""``tailbridge eval rewriter``: what rewriting does to retrieval on held-out queries.

Systems: ``none`` (the query alone), and each rewriter version given (SFT-only, aligned). A
version rewrites the queries the serving policy rewrites (``rewrite_strata``, tail by
default: the store holds rewrites for few-recall queries only), up to ``n`` rewrites each, with
the beam serving uses, and keeps those the store would keep (``intent.keep_on_intent`` at
``min_intent``; None: all). Each query is then searched as the handler searches it
(``search.ExactSearch``: dense and BM25 routes for the query and every rewrite, the rewrites'
weighted ``rewrite_route_weight``, reciprocal-rank fusion), and judged by nDCG@10 and
Recall@100 against the split's judgements, overall and per stratum; the rewrites themselves by
relevance, increment and hit rate (``feedback.score``), all of them as generated (the model's
quality, before the rule; ``rewritten`` queries got one, ``served`` kept one). A system also
reports how many rewrites the rule dropped and the distinct share of its first rewrites (a
model that collapses to a few answers writes the same rewrite for many queries). The report goes to JSON
and a PNG; each system's fused top 100 to a TREC run when asked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tailbridge.models.data.loaders import STRATA, load_dataset
from tailbridge.models.metrics import ndcg_at, recall_at
from tailbridge.models.rewriting import feedback as stage2
from tailbridge.models.rewriting.intent import keep_on_intent
from tailbridge.models.rewriting.signals import QuerySignals, query_signals

RETRIEVAL = ("ndcg@10", "recall@100")
QUALITY = stage2.SCORES


def generate_rewrites(generator: Any, texts: Sequence[str], n: int, beams: int) -> tuple[list[list[str]], float]:
    """Rewrites per text and the generation seconds."""
    started = time.perf_counter()
    rewrites = generator.rewrite(texts, n=n, beams=beams)
    return rewrites, time.perf_counter() - started


def judge(signals: Mapping[str, QuerySignals], qids: Sequence[str], rewrites: Mapping[str, list[str]],
          search: Any, generated: Mapping[str, list[str]] | None = None) -> tuple[list[list[str]], list[dict[str, float | None]]]:
    """Fused top 100 per query (the query and its ``rewrites``: what the store serves) and
    per-query metrics; the quality scores judge the ``generated`` rewrites (what the model
    wrote, before the intent rule; default: ``rewrites``) and are None without any."""
    generated = rewrites if generated is None else generated
    texts = [signals[q].text for q in qids]
    fused = search.ranked([[t, *rewrites.get(q, [])] for q, t in zip(qids, texts)])
    base = search.ranked([[t] for t in texts])
    own = search.ranked([[r] for q in qids for r in generated.get(q, [])])
    rows, cursor = [], 0
    for q, top, b in zip(qids, fused, base):
        judged = signals[q].judged
        row: dict[str, float | None] = {"ndcg@10": ndcg_at(top, judged, 10), "recall@100": recall_at(top, judged, 100),
                                        "served": bool(rewrites.get(q))}
        mine = generated.get(q, [])
        scored = [stage2.score(signals[q], b, own[cursor + k], r) for k, r in enumerate(mine)]
        cursor += len(mine)
        for name in QUALITY:
            row[name] = float(np.mean([getattr(s, name) for s in scored])) if scored else None
        rows.append(row)
    return fused, rows


def summarise(rows: Sequence[Mapping[str, float | None]], strata: Sequence[str | None]) -> dict[str, dict]:
    groups = {"overall": list(range(len(rows)))} | {s: [i for i, st in enumerate(strata) if st == s] for s in STRATA}
    out = {}
    for name, members in groups.items():
        if not members:
            continue
        row: dict[str, Any] = {"queries": len(members)}
        for m in (*RETRIEVAL, *QUALITY):
            values = [rows[i][m] for i in members if rows[i][m] is not None]
            row[m] = round(float(np.mean(values)), 4) if values else None
        row["rewritten"] = sum(1 for i in members if rows[i]["relevance"] is not None)
        row["served"] = sum(1 for i in members if rows[i]["served"])
        out[name] = row
    return out


def write_trec(path: Path, qids: Sequence[str], ranked: Sequence[Sequence[str]], system: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for qid, top in zip(qids, ranked):
            for rank, item in enumerate(top, 1):
                f.write(f"{qid} Q0 {item} {rank} {1.0 / rank:.6f} {system}\n")


def write_chart(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(report["systems"])
    groups = [g for g in ("overall", *STRATA) if g in report["systems"][systems[0]]["retrieval"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    width = 0.8 / len(systems)
    for ax, metric in zip(axes[:2], RETRIEVAL):
        for k, system in enumerate(systems):
            values = [report["systems"][system]["retrieval"][g][metric] or 0.0 for g in groups]
            bars = ax.bar(np.arange(len(groups)) + k * width, values, width, label=system)
            ax.bar_label(bars, fmt="%.3f", fontsize=6)
        ax.set_xticks(np.arange(len(groups)) + width * (len(systems) - 1) / 2, groups)
        ax.set_title(f"{metric} (rewrites fused)")
        ax.set_ylim(0, 1.05)
    rewriting = [s for s in systems if s != "none"]
    for k, system in enumerate(rewriting):
        tail = report["systems"][system]["retrieval"].get("tail") or report["systems"][system]["retrieval"]["overall"]
        bars = axes[2].bar(np.arange(len(QUALITY)) + k * width, [tail[m] or 0.0 for m in QUALITY], width, label=system)
        axes[2].bar_label(bars, fmt="%.3f", fontsize=6)
    axes[2].set_xticks(np.arange(len(QUALITY)) + width * (max(len(rewriting), 1) - 1) / 2, QUALITY)
    axes[2].set_title("rewrite quality (rewritten queries)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{report['data']} / {report['split']}: query rewriting, exact search")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distinct_share(rewrites: Sequence[Sequence[str]]) -> float | None:
    """Distinct first rewrites (normalised) per query that got one; None when none did."""
    from tailbridge.vocab import normalize_query

    first = [normalize_query(texts[0]) for texts in rewrites if texts]
    return round(len(set(first)) / len(first), 4) if first else None


def evaluate(data_dir: Path, search: Any, rewriters: Mapping[str, Callable[[], Any]], split: str = "test",
             rewrite_strata: Sequence[str] = ("tail",), n: int = 2, beams: int = 4, engaged: Mapping[str, set] | None = None,
             out_dir: Path | None = None, run_dir: Path | None = None, max_queries: int | None = None,
             min_intent: float | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """``rewriters``: system name -> a function loading its generator."""
    data = load_dataset(data_dir)
    signals = query_signals(data.queries, data.split(split), data.strata, engaged or {})
    qids = sorted(signals)
    targets = [q for q in qids if signals[q].stratum in rewrite_strata or "all" in rewrite_strata]
    if max_queries is not None:  # a budget: only the first rewritten queries, none of the others
        qids = targets = targets[:max_queries]
    strata = [signals[q].stratum for q in qids]
    say(f"{data.name}/{split}: {len(qids)} queries, {len(targets)} rewritten ({', '.join(rewrite_strata)})")
    report: dict[str, Any] = {"data": data.name, "split": split, "queries": len(qids), "rewritten_strata": list(rewrite_strata),
                              "rewrites_per_query": n, "beams": beams, "min_intent": min_intent,
                              "rewrite_route_weight": search.rewrite_weight, "systems": {}}
    runs: dict[str, list[list[str]]] = {}
    for system in ("none", *rewriters):
        rewrites: dict[str, list[str]] = {}  # kept by the rule: what search is given
        written: dict[str, list[str]] = {}  # what the model wrote
        info: dict[str, Any] = {}
        if system != "none":
            generator = rewriters[system]()
            queries = [signals[q].text for q in targets]
            generated, seconds = generate_rewrites(generator, queries, n, beams)
            kept, dropped = keep_on_intent(search, queries, generated, min_intent) if min_intent is not None \
                else (generated, 0)
            rewrites = {q: r for q, r in zip(targets, kept) if r}
            written = {q: r for q, r in zip(targets, generated) if r}
            info = {"generation_s": round(seconds, 2), "per_query_ms": round(1000 * seconds / max(len(targets), 1), 1),
                    "generated": sum(map(len, generated)), "dropped_by_intent": dropped,
                    "distinct_share": distinct_share(generated),
                    "examples": {signals[q].text: {"generated": g, "kept": k} for q, g, k in
                                 list(zip(targets, generated, kept))[:8]}}
        fused, rows = judge(signals, qids, rewrites, search, written)
        runs[system] = fused
        report["systems"][system] = {"retrieval": summarise(rows, strata)} | info
        say(f"{system}: done")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"rewriter-eval-{split}.json").write_text(json.dumps(report, indent=2))
        write_chart(report, out_dir / f"rewriter-eval-{split}.png")
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        for system, fused in runs.items():
            write_trec(run_dir / f"{system}.trec", qids, fused, system)
    return report
