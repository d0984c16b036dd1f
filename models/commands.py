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
    from models.data.beir import BeirFormatError
    from models.data.feedback import FeedbackError
    from models.data.loaders import DatasetError
    from models.evaluate import EvalError
    from models.train import TrainingError

    return DatasetError, BeirFormatError, FeedbackError, TrainingError, EvalError, FileNotFoundError


def train_retriever(data: Path, out: Path, version: str | None, feedback: Path | None, simulate_sessions: int,
                    restart: bool, threads: int | None, train_overrides: dict[str, Any], dim: int = 384) -> Path:
    from models.data.feedback import simulate_feedback, write_feedback
    from models.train import TrainConfig, train
    from models.unified import RetrieverConfig

    _threads(threads)
    try:
        if simulate_sessions:
            target = data / "feedback"
            if (target / "examples").is_dir():
                console.print(f"feedback log already at {target}: not simulating")
            elif not (data / "users.jsonl").exists():
                raise CommandError(f"--simulate-feedback needs demo data (users.jsonl) in {data}")
            else:
                with console.status(f"simulating {simulate_sessions} shopper sessions over the training queries..."):
                    write_feedback(simulate_feedback(data, simulate_sessions), target)
                console.print(f"wrote a simulated feedback log to {target}")
        cfg = TrainConfig(**{k: v for k, v in train_overrides.items() if v is not None})
        return train(data, out, version, RetrieverConfig.of_dim(dim), cfg, feedback, restart, say=console.print,
                     progress_factory=progress_bar)
    except _known_errors() as exc:
        raise CommandError(str(exc)) from None


def eval_retriever(data: Path, split: str, model: str | None, out: Path, run_dir: Path | None,
                   feedback: Path | None, threads: int | None) -> dict[str, Any]:
    from models.encoders import retriever_dir
    from models.evaluate import METRICS, evaluate

    if model is not None and not retriever_dir(model).is_dir():
        raise CommandError(f"no trained retriever at {retriever_dir(model)} (train one with `tailbridge train retriever`)")
    _threads(threads)
    try:
        report = evaluate(data, split, model, run_dir, out, feedback, progress_bar, console.print)
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
