"""What ``tailbridge train retriever`` and ``tailbridge eval retriever`` do, behind the thin CLI.

Both print progress bars (rich) and raise :class:`CommandError` with a readable message for
bad input (missing files, an unknown split, a checkpoint from other settings...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


class CommandError(Exception):
    pass


@contextmanager
def progress_bar(label: str, total: int) -> Iterator:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.advance(task, n)


def _threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


def _known_errors() -> tuple[type[Exception], ...]:
    from tailbridge.models.data.beir import BeirFormatError
    from tailbridge.models.data.feedback import FeedbackError
    from tailbridge.models.data.loaders import DatasetError
    from tailbridge.models.retrieval.evaluate import EvalError
    from tailbridge.models.retrieval.train import TrainingError

    return DatasetError, BeirFormatError, FeedbackError, TrainingError, EvalError, FileNotFoundError


def simulate_feedback_log(data: Path, sessions: int) -> Path:
    """``--simulate-feedback N``: write a feedback log for demo data to ``DATA/feedback`` from N
    simulated shopper sessions over the training queries (kept if one is already there)."""
    from tailbridge.models.data.feedback import write_feedback
    from tailbridge.synthetic.feedback import simulate_feedback

    target = data / "feedback"
    if (target / "examples").is_dir():
        console.print(f"feedback log already at {target}: not simulating")
    elif not (data / "users.jsonl").exists():
        raise CommandError(f"--simulate-feedback needs demo data (users.jsonl) in {data}")
    else:
        with console.status(f"simulating {sessions} shopper sessions over the training queries..."):
            write_feedback(simulate_feedback(data, sessions), target)
        console.print(f"wrote a simulated feedback log to {target}")
    return target


def train_retriever(data: Path, out: Path, version: str | None, feedback: Path | None, simulate_sessions: int,
                    restart: bool, threads: int | None, train_overrides: dict[str, Any], dim: int = 384) -> Path:
    from tailbridge.models.retrieval.train import TrainConfig, train
    from tailbridge.models.retrieval.model import RetrieverConfig

    _threads(threads)
    try:
        if simulate_sessions:
            simulate_feedback_log(data, simulate_sessions)
        cfg = TrainConfig(**{k: v for k, v in train_overrides.items() if v is not None})
        return train(data, out, version, RetrieverConfig.of_dim(dim), cfg, feedback, restart, say=console.print,
                     progress_factory=progress_bar)
    except _known_errors() as exc:
        raise CommandError(str(exc)) from None


def eval_retriever(data: Path, split: str, model: str | None, out: Path, run_dir: Path | None,
                   feedback: Path | None, threads: int | None) -> dict[str, Any]:
    from tailbridge.models.retrieval.encoders import retriever_dir
    from tailbridge.models.retrieval.evaluate import METRICS, evaluate

    if model is not None and not retriever_dir(model).is_dir():
        raise CommandError(f"no trained retriever at {retriever_dir(model)} (train one with `tailbridge train retriever`)")
    from tailbridge.settings import get_settings

    _threads(threads)
    try:
        report = evaluate(data, split, model, run_dir, out, feedback, progress_bar, console.print,
                          cache_dir=get_settings().data_dir / "cache" / "encodings")
    except _known_errors() as exc:
        raise CommandError(str(exc)) from None
    table = Table(title=f"{report['data']} / {split}: {report['queries']} queries, {report['items']} items, exact search")
    table.add_column("system", no_wrap=True)
    table.add_column("stratum", no_wrap=True)
    table.add_column("queries", justify="right")
    for m in METRICS:
        table.add_column(m, justify="right", no_wrap=True)
    for system, groups in report["systems"].items():
        for stratum, row in groups.items():
            table.add_row(system if stratum == "overall" else "", stratum, str(row["queries"]),
                          *("-" if row[m] is None else f"{row[m]:.4f}" for m in METRICS))
    console.print(table)
    console.print(f"wrote {out / f'eval-{split}.json'} and {out / f'eval-{split}.png'}"
                  + (f"; TREC runs in {run_dir}" if run_dir else ""))
    return report


# ------------------------------------------------------------------ ranker (models/ranking/)


def _ranker_errors() -> tuple[type[Exception], ...]:
    from tailbridge.models.ranking.dataset import RankerTrainingError

    return (*_known_errors(), RankerTrainingError)


def worker_feedback_dir() -> Path:
    """Where the stream worker writes the feedback log (``streams.behaviour.feedback_dir``; not
    imported from there because that module pulls in Feast and Milvus clients)."""
    from tailbridge.settings import get_settings

    return get_settings().data_dir / "offline" / "feedback"


def ranker_feedback(data: Path, feedback: Path | None, trained_on: Path | None = None) -> Path:
    """The feedback log to use: ``--feedback``; else the log a model was trained on; else
    ``DATA/feedback``; else the stream worker's log."""
    if feedback is not None:
        if not (feedback / "examples").is_dir():
            raise CommandError(f"no feedback log at {feedback} (expected {feedback}/examples/date=YYYY-MM-DD/*.parquet)")
        return feedback
    for candidate in (trained_on, data / "feedback", worker_feedback_dir()):
        if candidate is not None and (candidate / "examples").is_dir():
            return candidate
    raise CommandError(f"no feedback log: none in {data / 'feedback'} or {worker_feedback_dir()} (the stream "
                       "worker's). Pass --feedback DIR, run `tailbridge worker` during live traffic, or for demo data "
                       "add --simulate-feedback N (e.g. 20000) to simulate shopper sessions")


def train_ranker(data: Path, out: Path, version: str | None, feedback: Path | None, simulate_sessions: int,
                 baseline: bool, threads: int | None, train_overrides: dict[str, Any]) -> Path:
    from tailbridge.models.ranking.training import RankerTrainConfig, train

    if not data.is_dir():
        raise CommandError(f"{data}: data directory not found")
    _threads(threads)
    try:
        if simulate_sessions and feedback is None:
            simulate_feedback_log(data, simulate_sessions)
        log = ranker_feedback(data, feedback)
        cfg = RankerTrainConfig(**{k: v for k, v in train_overrides.items() if v is not None})
        return train(data, log, out, version, cfg=cfg, baseline=baseline, say=console.print,
                     progress_factory=progress_bar)
    except _ranker_errors() as exc:
        raise CommandError(str(exc)) from None


def eval_ranker(data: Path, model: str | None, feedback: Path | None, threads: int | None,
                judged_queries: int = 150) -> dict[str, Any]:
    import json

    from tailbridge.models.ranking import model as rk
    from tailbridge.models.ranking.evaluation import evaluate
    from tailbridge.serving.search import blend  # the query handler's blend of ranker and retrieval order

    if not data.is_dir():
        raise CommandError(f"{data}: data directory not found")
    if model is None:
        root = rk.ranker_root()
        trained = sorted((p for p in root.iterdir() if (p / rk.CONFIG_FILE).is_file()),
                         key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        if not trained:
            raise CommandError(f"no trained ranker in {root} (train one with `tailbridge train ranker`)")
        model_dir = trained[-1]
    else:
        model_dir = rk.ranker_dir(model)
        if not (model_dir / rk.CONFIG_FILE).is_file():
            known = ", ".join(rk.known_versions()) or "none"
            raise CommandError(f"no trained ranker at {model_dir} (known versions: {known}; "
                               "train one with `tailbridge train ranker`)")
    _threads(threads)
    try:
        trained_on = json.loads((model_dir / "metrics.json").read_text())["data"]["feedback_dir"] \
            if (model_dir / "metrics.json").is_file() else None
        log = ranker_feedback(data, feedback, Path(trained_on) if trained_on else None)
        report = evaluate(data, model_dir, log, say=console.print, blend=blend,
                          judged_queries=judged_queries, truth=simulator_truth(data))
    except _ranker_errors() as exc:
        raise CommandError(str(exc)) from None
    print_ranker_report(report)
    console.print(f"wrote {model_dir / 'eval-ranker.json'}")
    return report


def simulator_truth(data: Path) -> Any:
    """The simulator's ground truth for demo data (``synthetic.shoppers.GroundTruth``: personas
    and grades from the data dir), or None for data that was not simulated."""
    from tailbridge.synthetic import catalog
    from tailbridge.synthetic.shoppers import GroundTruth

    if not ((data / "manifest.json").is_file() and (data / "users.jsonl").is_file()):
        console.print(f"{data} is not simulated demo data (no manifest.json / users.jsonl): "
                      "no ground truth, the counterfactual metrics are skipped")
        return None
    return GroundTruth(catalog.load(data))


def print_ranker_report(report: dict[str, Any]) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    test = report["test"]
    table = Table(title=f"ranker {report['model']} on {report['data']}: {test['searches']} test searches "
                        f"({test['rows']} rows; {test['rows_click']} clicks, {test['rows_add_to_cart']} carts, "
                        f"{test['rows_purchase']} purchases), after the training period; served pages re-ranked")
    table.add_column("system", no_wrap=True)
    for column in ("AUC\nclick", "AUC\ncart", "AUC\npurchase", "purchase\nnDCG@10", "purchase nDCG@10\nIPS",
                   "graded\nnDCG@10"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, row in report["systems"].items():
        table.add_row(name, *(fmt(row["auc"][t]) for t in ("click", "add_to_cart", "purchase")),
                      fmt(row["ndcg@10_purchase"]), fmt(row.get("ndcg@10_purchase_ips")), fmt(row["ndcg@10_graded"]))
    console.print(table)
    some = next(iter(report["systems"].values()))
    exam = report.get("examination")
    console.print(f"LOGGED LABELS: purchase nDCG on {some['pages_with_purchase']} pages with a purchase, graded "
                  f"(click 1, cart 2, purchase 3) on {some['pages_with_click']} with a click; the logged order's labels "
                  f"were caused by that order (examination falls with position). Single-task AUCs are its one "
                  f"probability against each label; a model's AUCs are its heads', '... by p(purchase)' ranks by the "
                  f"purchase head alone instead of the weighted score; weights {report['weights']}" + (
                      "; IPS gain 1/exam(position), exam learned from the log: "
                      + " ".join(f"{k}:{e:.2f}" for k, e in enumerate(exam) if k) if exam else ""))
    truth = report.get("truth")
    if truth:
        table = Table(title=f"COUNTERFACTUAL (simulated data only): the simulator's true position-free p(purchase) of "
                            f"each served item as its gain, {truth['pages']} test pages ({truth['pages_unknown']} "
                            f"unknown to the simulator left out)")
        table.add_column("system", no_wrap=True)
        for column in ("expected purchase\nnDCG@10", "expected purchases\nper page",
                       "IPS purchase nDCG@10\ntrue examination"):
            table.add_column(column, justify="right", no_wrap=True)
        for name, row in report["systems"].items():
            t = row["truth"]
            table.add_row(name, fmt(t["ndcg@10_purchase_expected"]), fmt(t["expected_purchases_per_page"]),
                          fmt(t["ndcg@10_purchase_ips_true_exam"]))
        console.print(table)
        console.print("expected purchases per page: the page served in that order, each item's true p(purchase) times "
                      "the simulator's examination of its new position: "
                      + " ".join(f"{k}:{e:.2f}" for k, e in enumerate(truth["examination"]) if k))
    judged = report.get("judged")
    if judged:
        table = Table(title=f"relevance: nDCG@10 re-ranking {judged['retriever']}'s top {judged['candidates']} on "
                            f"{judged['queries']} judged test queries (no user, behaviour priors)")
        table.add_column("order", no_wrap=True)
        table.add_column("nDCG@10", justify="right")
        for name, value in judged["ndcg@10"].items():
            table.add_row(name, f"{value:.4f}")
        console.print(table)
    for n, lat in report["latency_ms"].items():
        for clock, times in (("wall clock", lat), ("thread CPU time", lat["cpu"])):
            console.print(f"score() over {n} cached candidates, 1 thread, {lat['calls']} calls, {clock}: new query "
                          f"p50 {times['new_query']['p50']:.2f} ms / p99 {times['new_query']['p99']:.2f} ms; cached "
                          f"query p50 {times['cached_query']['p50']:.2f} / p99 {times['cached_query']['p99']:.2f} ms; "
                          f"query encode ({lat['query_encoder']}) p50 {times['query_encode']['p50']:.2f} / p99 "
                          f"{times['query_encode']['p99']:.2f} ms")
