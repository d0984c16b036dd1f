"""Re-aligning models from the live feedback log: the training and scoring steps of the loop.

The loop (``tailbridge loop``) splits the log at a cutoff: searches before it train the
candidates, the recent ones after it are the held-out slice the gate (``models.gate``) scores
candidate and serving versions on. Everything reads the log through the same code as the
trainers and serving (``models.ranking.dataset.prepare``: point-in-time item stats and the
one user-context fold), so the loop never scores a model on features serving would not have.

* ranker: retrained with the serving version's own model and training settings on the log up
  to the cutoff (``models.ranking.training.train``, the time budget as its ``max_minutes``);
* retriever: fine-tuned from the serving version: a new trainer is built on the current data
  (graph and term statistics rebuilt from the log up to the cutoff), every parameter the two
  share by name and shape is copied from the parent, then the ROAR / multi-grained stages run
  within the time budget (``models.retrieval.train``);
* replay: each held-out page re-ranked by a ranker's score or by a retriever's query-item
  cosine; judged: a retriever's nDCG@10 on the data's judged test split.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tailbridge.models.data.feedback import read_feedback, write_feedback
from tailbridge.models.gate import Page, replay_ndcg
from tailbridge.models.metrics import ndcg_at

Say = Callable[[str], None]


# ------------------------------------------------------------------ the log and its split


def log_cutoff(feedback_dir: Path, holdout_fraction: float) -> tuple[pd.Timestamp, str, int]:
    """(time, search id) of the last search before the held-out slice (the latest
    ``holdout_fraction`` of searches), and how many searches the log holds."""
    frame = read_feedback(feedback_dir).drop_duplicates("query_id")
    searches = list(zip(frame["event_time"], frame["query_id"].astype(str)))
    if len(searches) < 2:
        raise ValueError(f"{feedback_dir}: {len(searches)} logged searches, too few to hold some out")
    last_train = max(0, min(len(searches) - 2, int(round(len(searches) * (1 - holdout_fraction))) - 1))
    when, search = searches[last_train]
    return when, search, len(searches)


def training_log(feedback_dir: Path, cutoff: tuple[pd.Timestamp, str], out: Path) -> Path:
    """A copy of the log up to the cutoff, for trainers that read a whole log directory."""
    frame = read_feedback(feedback_dir)
    keep = [(t, q) <= cutoff for t, q in zip(frame["event_time"], frame["query_id"].astype(str))]
    write_feedback(frame[keep], out)
    return out


# ------------------------------------------------------------------ training


def retrain_ranker(data_dir: Path, log_dir: Path, out_root: Path, version: str, parent_dir: Path | None,
                   minutes: float, say: Say, test_fraction: float) -> Path:
    """A ranker with the parent's model and training settings (the defaults without one),
    trained on ``log_dir`` within ``minutes``; ``test_fraction`` is what the trainer holds out."""
    from tailbridge.models.ranking import model as rk
    from tailbridge.models.ranking.training import RankerTrainConfig, train

    model_cfg, overrides = None, {}
    if parent_dir is not None:
        config = json.loads((Path(parent_dir) / rk.CONFIG_FILE).read_text())
        model_cfg = rk.RankerConfig.from_json(config["ranker"])
        known = {f.name for f in dataclasses.fields(RankerTrainConfig)}
        overrides = {k: tuple(v) if isinstance(v, list) else v
                     for k, v in config.get("training", {}).items() if k in known}
    cfg = RankerTrainConfig(**(overrides | {"max_minutes": minutes, "test_fraction": test_fraction}))
    return train(data_dir, log_dir, out_root, version, model_cfg=model_cfg, cfg=cfg, baseline=False, say=say)


def finetune_retriever(data_dir: Path, log_dir: Path, out_root: Path, version: str, parent_dir: Path,
                       minutes: float, say: Say, train_overrides: dict[str, Any] | None = None) -> Path:
    """Fine-tune the parent retriever on the current data and log within ``minutes``."""
    import torch

    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.models.retrieval import train as rt
    from tailbridge.models.retrieval.model import load as load_retriever

    started = time.monotonic()
    parent, _ = load_retriever(Path(parent_dir))
    config = json.loads((Path(parent_dir) / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(rt.TrainConfig)}
    settings = {k: v for k, v in config.get("training", {}).items() if k in known}
    cfg = rt.TrainConfig(**(settings | (train_overrides or {}) | {"max_minutes": minutes}))
    data = load_dataset(data_dir)
    ts = rt.prepare(data, cfg, log_dir, say)
    out_dir = Path(out_root) / version
    trainer = rt.Trainer(ts, parent.cfg, cfg, out_dir, torch.device("cpu"), say, None)
    trainer.fingerprint = rt.fingerprint(data, ts, parent.cfg, cfg)  # what its checkpoints are checked against
    copied = warm_start(trainer.model, parent)
    say(f"retriever {version}: {copied} parameter tensors from {Path(parent_dir).name}")
    trainer.run(started)
    rt.write_artifact(trainer, out_dir, Path(data_dir), log_dir, time.monotonic() - started)
    return out_dir


# Rebuilt from the current log and catalog, never copied: graph rows and term statistics.
_NOT_INHERITED = ("graph.table", "terms.idf")


def warm_start(model, parent) -> int:
    """Copy the parent's parameters into ``model`` where name and shape match; returns how many."""
    import torch

    target, copied = model.state_dict(), 0
    with torch.no_grad():
        for name, value in parent.state_dict().items():
            if name in target and target[name].shape == value.shape and not name.endswith(_NOT_INHERITED):
                target[name].copy_(value)
                copied += 1
    return copied


# ------------------------------------------------------------------ scoring for the gate


def heldout_slice(data_dir: Path, feedback_dir: Path, cutoff: tuple[pd.Timestamp, str], max_pages: int, say: Say):
    """The logged searches after the cutoff (at most the latest ``max_pages``) with the features
    and contexts serving would have had: ``(RankerData, search indices)``."""
    from tailbridge.models.ranking.dataset import prepare

    rd = prepare(Path(data_dir), Path(feedback_dir), test_after=(cutoff[0].isoformat(), cutoff[1]), say=say)
    searches = list(range(rd.train_searches, len(rd.search_ids)))[-max_pages:]
    return rd, searches


def _page(rd, s: int, scores) -> Page:
    rows = range(rd.search_start[s], rd.search_start[s + 1])
    return Page(list(scores), [int(rd.position[r]) for r in rows], [max(0, int(rd.level[r]) - 1) for r in rows])


def ranker_scores(ranker, rd, searches: list[int]) -> np.ndarray:
    """The ranker's score of every row of ``searches``' pages (NaN on other rows), as serving
    scores them: query text, the page's candidates and the shopper's context."""
    scores = np.full(rd.rows, np.nan)
    for s in searches:
        start = rd.search_start[s]
        out = ranker.score(rd.query_texts[rd.query[start]], rd.candidates(s), rd.contexts[s])
        scores[start:rd.search_start[s + 1]] = [o["score"] for o in out]
    return scores


def ranker_replay(ranker, rd, searches: list[int], scores: np.ndarray | None = None) -> dict[str, Any]:
    """Each held-out page re-ranked by the ranker (or by ``scores``, ``ranker_scores``'s) and
    scored on its logged outcomes."""
    scores = ranker_scores(ranker, rd, searches) if scores is None else scores
    return replay_ndcg([_page(rd, s, scores[rd.search_start[s]:rd.search_start[s + 1]]) for s in searches])


def retriever_replay(encoder, rd, searches: list[int]) -> dict[str, Any]:
    """Pages re-ranked by the cosine of the query (with the shopper's context) to each item."""
    if not searches:
        return replay_ndcg([])
    starts = [rd.search_start[s] for s in searches]
    queries = encoder.encode_queries([rd.query_texts[rd.query[i]] for i in starts], [rd.contexts[s] for s in searches])
    page_items = sorted({rd.item_ids[rd.item[r]] for s in searches
                         for r in range(rd.search_start[s], rd.search_start[s + 1])})
    vectors = dict(zip(page_items, encoder.encode_items([rd.items[i] for i in page_items])))
    pages = []
    for q, s in zip(queries, searches):
        rows = range(rd.search_start[s], rd.search_start[s + 1])
        pages.append(_page(rd, s, [float(q @ vectors[rd.item_ids[rd.item[r]]]) for r in rows]))
    return replay_ndcg(pages)


def retriever_judged(encoder, data_dir: Path, max_queries: int, split: str = "test") -> float | None:
    """nDCG@10 of exact search over the catalog on the judged split (None when there is none)."""
    from tailbridge.models.data.loaders import load_dataset

    data = load_dataset(data_dir)
    if split not in data.qrels:
        return None
    judged = data.split(split)
    qids = sorted(judged)[:max_queries]
    if not qids:
        return None
    item_ids = sorted(data.items)
    catalog = [data.items[i] for i in item_ids]
    items = encoder.encode_items(catalog)
    queries = encoder.encode_queries([data.queries[q] for q in qids])
    top = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    return float(np.mean([ndcg_at([item_ids[j] for j in row], judged[q], 10) for q, row in zip(qids, top)]))
