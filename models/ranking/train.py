"""Training and evaluating the multi-task ranker: ``tailbridge train ranker`` / ``eval ranker``.

1. Data: the feedback log (``models.data.feedback``: one row per served item, labelled
   shown_unclicked < clicked < added_to_cart < purchased) and the catalog of the data dir.
   Rows whose item is not in the catalog are dropped.
2. Split by time: the log's searches in time order; the last ``test_fraction`` (20%) are the
   test split, and no test search is trained on. The artifact records the last training
   search, and evaluation tests on every logged search after it (a log that grew since
   training adds test searches, never training ones).
3. Point-in-time features, so nothing a row's own labels say reaches its features:
   * item behaviour: ``ctr_24h``, ``cvr_24h``, ``purchases_24h`` as the stream worker computes
     them (``streams.item_stats``: same smoothing priors), over the log's searches in the 24 h
     before the row's search -- strictly earlier ones, so never the row's own search;
   * user context: the shopper's engagements before the search
     (``models.data.feedback.searches_with_context``, what the Feast ``user_context`` view
     held then).
   A log search's engagements are counted from the search's time; on real traffic a click
   that came after a later search started is a few seconds early (the simulator's sessions
   never overlap like that).
4. Stage 1: the text encoder frozen, every training row ``epochs`` times: the encodings of
   the log's query texts and of the catalog are computed once, and the shared projection,
   trunk and heads learn from them (seconds per epoch). Stage 2: the encoder's top
   ``train_layers`` and the projection are fine-tuned under the trained trunk and heads (kept
   fixed: batches of a few pages would only add noise to them) on batches of whole searches
   (each step encodes its queries and products again; the frozen lower layers' outputs are
   cached, ``models.retrieval.train.TextSource``) for ``finetune_steps`` steps or the time budget. A step
   costs about a second on one CPU core, so stage 2 is short by default; on the demo data the
   served pages are nearly all exact matches, so text says little within a page and stage 2
   changes the test AUCs by less than 0.001 either way.
5. Artifact ``<root>/<version>/``: weights (safetensors), config JSON, tokenizer, the catalog's
   product encodings, ``metrics.json`` and ``MODEL_CARD.md``; the single-task click baseline,
   trained the same way on the same rows, in ``baseline-click/`` (unless ``baseline=False``).

Evaluation (``evaluate``) scores each test search's served page through ``Ranker.score`` (the
serving path): AUC per head over all test rows, purchase nDCG@10 per page (gain 1 for a
purchase, over pages with one) and graded nDCG@10 (gains clicked 1, carted 2, purchased 3,
over pages with a click), for the multi-task model, the click-only baseline and the logged
order; and the latency of ``score`` over 100 cached candidates on one thread.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch

from tailbridge.models.ranking import model as rk
from tailbridge.models.data.feedback import read_feedback, searches_with_context
from tailbridge.models.data.loaders import load_dataset
from tailbridge.models.metrics import ndcg_at
from tailbridge.vocab import LABEL_LEVEL, PRIOR_CTR, PRIOR_CTR_WEIGHT, PRIOR_CVR, PRIOR_CVR_WEIGHT

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class RankerTrainConfig:
    epochs: int = 4  # stage 1: passes over the training rows with the text encoder frozen
    batch_size: int = 512  # rows per stage-1 step
    finetune_steps: int = 60  # stage 2: steps with the encoder's top layers trained (trunk and heads fixed)
    finetune_searches: int = 16  # searches (pages) per stage-2 step
    lr: float = 2e-3  # projection, trunk and heads
    lr_text: float = 3e-5  # fine-tuned encoder layers
    weight_decay: float = 0.01
    test_fraction: float = 0.2  # the latest searches, held out
    stats_window_hours: float = 24.0
    max_minutes: float | None = 10.0  # both models together; stage 2 ends early to finish in time
    # Method 5's lowest level: random catalog items per training search, labelled nothing. Logged
    # pages are ~all relevant, so without them the ranker never learns to push down what
    # retrieval brings in from other categories.
    random_negatives: int = 4
    encode_batch: int = 256
    export_onnx: bool = True  # the query encoder as ONNX too (what serving runs per search)
    seed: int = 7


class RankerTrainingError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# Data: rows, point-in-time features, the split
# --------------------------------------------------------------------------------------------


def point_in_time_stats(frame: pd.DataFrame, window_hours: float = 24.0) -> np.ndarray:
    """[rows, 3]: ctr_24h, cvr_24h, purchases_24h of each row's item as they stood just before the
    row's search: from the log's rows of strictly earlier searches within the window (one
    impression per served row, a click for clicked-or-better, a purchase for purchased), smoothed
    like the stream worker's ``item_stats``. ``frame`` is in ``read_feedback`` (time) order."""
    n = len(frame)
    times = ((frame["event_time"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ns")).to_numpy(np.int64)
    items = frame["item_id"].astype(str).to_numpy()
    levels = frame["label"].map(LABEL_LEVEL).to_numpy()
    window = int(window_hours * 3600 * 1e9)
    events: dict[str, deque] = {}  # item -> (time, click, purchase) inside the window
    totals: dict[str, list[int]] = {}  # item -> [impressions, clicks, purchases]
    out = np.zeros((n, 3), dtype=np.float32)
    start = 0
    while start < n:
        end = start
        while end < n and times[end] == times[start]:
            end += 1
        now = times[start]
        for r in range(start, end):  # rows at one instant see only earlier ones
            queue, total = events.get(items[r]), totals.get(items[r])
            while queue and queue[0][0] <= now - window:
                _, c, p = queue.popleft()
                total[0] -= 1
                total[1] -= c
                total[2] -= p
            imps, clicks, purchases = total or (0, 0, 0)
            out[r] = ((clicks + PRIOR_CTR * PRIOR_CTR_WEIGHT) / (imps + PRIOR_CTR_WEIGHT),
                      (purchases + PRIOR_CVR * PRIOR_CVR_WEIGHT) / (clicks + PRIOR_CVR_WEIGHT), purchases)
        for r in range(start, end):
            c, p = int(levels[r] >= LABEL_LEVEL["clicked"]), int(levels[r] == LABEL_LEVEL["purchased"])
            events.setdefault(items[r], deque()).append((times[r], c, p))
            total = totals.setdefault(items[r], [0, 0, 0])
            total[0] += 1
            total[1] += c
            total[2] += p
        start = end
    return out


def candidate(item: Mapping[str, Any], stats: Sequence[float]) -> dict[str, Any]:
    """A catalog item shaped like a search hit: its fields plus the behaviour stats."""
    return {**item, "ctr_24h": float(stats[0]), "cvr_24h": float(stats[1]), "purchases_24h": float(stats[2])}


@dataclass
class RankerData:
    name: str
    items: dict[str, dict[str, Any]]  # the catalog
    item_ids: list[str]  # encoding order of the catalog
    query_texts: list[str]  # distinct query texts of the log
    search_ids: list[str]  # logged searches in time order
    search_times: list[pd.Timestamp]
    contexts: list[dict[str, Any] | None]  # per search: the user's context just before it
    search_start: np.ndarray  # [searches + 1]: rows of search s are search_start[s]:search_start[s + 1]
    query: np.ndarray  # per row: index into query_texts
    item: np.ndarray  # per row: index into item_ids
    position: np.ndarray  # per row: 1-based rank on the served page
    level: np.ndarray  # per row: LABEL_LEVEL
    stats: np.ndarray  # per row: [ctr_24h, cvr_24h, purchases_24h] at the search
    features: np.ndarray  # per row: models.ranking.model.FEATURES
    train_searches: int  # searches [0, train_searches) train, the rest test
    # Random negatives of training searches (not rows of any page): query, item, features.
    random_query: np.ndarray
    random_item: np.ndarray
    random_features: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.level)

    def split_rows(self, split: str) -> np.ndarray:
        cut = self.search_start[self.train_searches]
        return np.arange(cut) if split == "train" else np.arange(cut, self.rows)

    def candidates(self, s: int) -> list[dict[str, Any]]:
        rows = range(self.search_start[s], self.search_start[s + 1])
        return [candidate(self.items[self.item_ids[self.item[r]]], self.stats[r]) for r in rows]


def prepare(data_dir: Path, feedback_dir: Path, test_fraction: float = 0.2, window_hours: float = 24.0,
            test_after: tuple[str, str] | None = None, say: Callable[[str], None] = print,
            random_negatives: int = 0, seed: int = 7) -> RankerData:
    """Rows, features and the split. ``test_after`` = (ISO time, search id) of the last training
    search: the test split is every search after it (evaluation of a trained version)."""
    data = load_dataset(data_dir)
    frame = read_feedback(feedback_dir)
    dropped = int((~frame["item_id"].isin(data.items.keys())).sum())
    frame = frame[frame["item_id"].isin(data.items.keys())].reset_index(drop=True)
    if frame.empty:
        raise RankerTrainingError(f"{feedback_dir}: no logged row names an item of the catalog in {data_dir}")
    if dropped:
        say(f"feedback: dropped {dropped} rows whose item is not in the catalog")
    categories = {i: rk.leaf_category(it) for i, it in data.items.items()}
    catalog = rk.Catalog.from_items([data.items[i] for i in sorted(data.items)])  # as the artifact ships it
    with_context = searches_with_context(frame, categories)  # insertion order = time order

    search_ids = list(with_context)
    first = frame.drop_duplicates("query_id")
    times = dict(zip(first["query_id"].astype(str), first["event_time"]))
    search_index = {s: k for k, s in enumerate(search_ids)}
    row_search = frame["query_id"].astype(str).map(search_index).to_numpy()
    search_start = np.searchsorted(row_search, np.arange(len(search_ids) + 1))
    item_ids = sorted(data.items)
    item_index = {i: k for k, i in enumerate(item_ids)}
    query_texts = sorted(set(frame["query"].astype(str)))
    query_index = {q: k for k, q in enumerate(query_texts)}

    stats = point_in_time_stats(frame, window_hours)
    contexts = [with_context[s]["context"] for s in search_ids]
    views = [rk.user_view(c, catalog) for c in contexts]
    items_col = frame["item_id"].astype(str).tolist()
    feats = np.array([rk.features(candidate(data.items[i], st), views[s], catalog)
                      for i, st, s in zip(items_col, stats, row_search)], dtype=np.float32)

    if test_after is not None:
        after = (pd.Timestamp(test_after[0]), test_after[1])
        train_searches = sum(1 for s in search_ids if (times[s], s) <= after)
    else:
        train_searches = int(round(len(search_ids) * (1 - test_fraction)))
    query_col = frame["query"].astype(str).map(query_index).to_numpy()
    negative_search = np.repeat(np.arange(train_searches), random_negatives)
    negative_item = np.random.default_rng(seed).integers(len(item_ids), size=len(negative_search))
    no_stats = (PRIOR_CTR, PRIOR_CVR, 0.0)  # an item nobody engaged with, as the stats smooth it
    negative_feats = np.array([rk.features(candidate(data.items[item_ids[i]], no_stats), views[s], catalog)
                               for s, i in zip(negative_search, negative_item)], dtype=np.float32)
    return RankerData(
        random_query=query_col[search_start[negative_search]], random_item=negative_item,
        random_features=negative_feats.reshape(len(negative_search), len(rk.FEATURES)),
        name=data.name, items=data.items, item_ids=item_ids, query_texts=query_texts, search_ids=search_ids,
        search_times=[times[s] for s in search_ids], contexts=contexts, search_start=search_start,
        query=query_col, item=np.array([item_index[i] for i in items_col]),
        position=frame["position"].to_numpy(), level=frame["label"].map(LABEL_LEVEL).to_numpy(), stats=stats,
        features=feats, train_searches=train_searches,
    )


# --------------------------------------------------------------------------------------------
# Texts: token ids, cached frozen prefix, initial encodings
# --------------------------------------------------------------------------------------------


@dataclass
class Texts:
    queries: Any  # models.retrieval.train.TextSource over RankerData.query_texts
    items: Any  # ... over the catalog's product texts
    query_pooled: torch.Tensor  # [queries, hidden] the untrained encoder's pooled vectors (stage 1)
    item_pooled: torch.Tensor  # [items, hidden]


def cache_texts(rd: RankerData, model_cfg: rk.RankerConfig, cfg: RankerTrainConfig, bar: Callable) -> Texts:
    """Tokenise every text once, cache the frozen layers' outputs and the initial pooled vectors.
    Both the multi-task model and the baseline start from the same MiniLM, so they share this."""
    from tailbridge.models.retrieval.train import TextSource

    model, tokenizer = rk.build(model_cfg)
    model.eval()
    featurizer = SimpleNamespace(tokenizer=tokenizer, cfg=model_cfg)  # what TextSource reads
    device = torch.device("cpu")
    sources, pooled = [], []
    for label, texts in (("queries", rd.query_texts),
                         ("products", [rk.product_text(rd.items[i]) for i in rd.item_ids])):
        with bar(f"caching frozen text layers ({label})", len(texts)) as advance:
            source = TextSource(model, featurizer, texts, device, cfg.encode_batch, advance)
        out = torch.zeros(len(texts), model.text.hidden)
        with torch.no_grad(), bar(f"initial encodings ({label})", len(texts)) as advance:
            for start in range(0, len(texts), cfg.encode_batch):
                idx = list(range(start, min(len(texts), start + cfg.encode_batch)))
                out[idx] = model.text(source.get(idx).to(device))
                advance(len(idx))
        sources.append(source)
        pooled.append(out)
    return Texts(sources[0], sources[1], pooled[0], pooled[1])


# --------------------------------------------------------------------------------------------
# Training one model
# --------------------------------------------------------------------------------------------


def fit(rd: RankerData, texts: Texts, model_cfg: rk.RankerConfig, cfg: RankerTrainConfig, deadline: float | None,
        say: Callable[[str], None], bar: Callable) -> tuple[rk.RankerModel, Any, dict[str, Any]]:
    """Stage 1 (frozen text) then stage 2 (fine-tuning); returns the model, tokenizer, history."""
    name = "+".join(model_cfg.tasks)
    torch.manual_seed(cfg.seed)
    model, tokenizer = rk.build(model_cfg)
    train_rows = rd.split_rows("train")
    if len(train_rows) == 0:
        raise RankerTrainingError("no training searches (the feedback log is too small for the split)")
    # Stage-1 rows: every logged row, then the random negatives (indices past rd.rows).
    feats = torch.from_numpy(np.concatenate([rd.features, rd.random_features]))
    labels = torch.from_numpy(rk.labels_from_level(np.concatenate([rd.level, np.zeros(len(rd.random_item), int)])))
    query_of = torch.from_numpy(np.concatenate([rd.query, rd.random_query]))
    item_of = torch.from_numpy(np.concatenate([rd.item, rd.random_item]))
    train_rows = np.concatenate([train_rows, rd.rows + np.arange(len(rd.random_item))])
    with torch.no_grad():
        model.feature_mean.copy_(feats[train_rows].mean(0))
        model.feature_std.copy_(feats[train_rows].std(0).clamp(min=1e-3))
    tasks = model_cfg.tasks
    history: dict[str, Any] = {"stage1_steps": 0, "stage2_steps": 0, "losses": {}}

    def record(stage: int, per_head: dict[str, torch.Tensor]) -> None:
        for t, v in per_head.items():
            history["losses"].setdefault(f"stage{stage}_{t}", []).append(float(v.detach()))

    # Stage 1: encodings fixed, everything after the pooled vector trains.
    head_params = [p for n, p in model.named_parameters() if not n.startswith("text.")]
    opt = torch.optim.AdamW(head_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(train_rows) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.05, 1 - s / max(1, steps)))
    model.train()
    out_of_time = lambda: deadline is not None and time.monotonic() > deadline  # noqa: E731
    for epoch in range(cfg.epochs):
        if epoch > 0 and out_of_time():  # the first epoch always completes
            say(f"{name}: time budget: stage 1 ends after {epoch} epochs")
            break
        order = np.random.default_rng([cfg.seed, 1, epoch]).permutation(train_rows)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        with bar(f"{name}: stage 1 epoch {epoch + 1}/{cfg.epochs}", len(batches)) as advance:
            for rows in batches:
                if epoch > 0 and out_of_time():
                    break
                rows = torch.from_numpy(rows)
                q = model.embed(texts.query_pooled[query_of[rows]])
                p = model.embed(texts.item_pooled[item_of[rows]])
                loss, per_head = rk.multitask_loss(model(q, p, feats[rows], tasks), labels[rows], tasks)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head_params, 5.0)
                opt.step()
                sched.step()
                record(1, per_head)
                history["stage1_steps"] += 1
                advance(1)

    # Stage 2: the encoder's top layers (and the projection) adapt under the trained trunk and
    # heads, which stay as they are: small batches of pages would only add noise to them.
    if cfg.finetune_steps > 0 and model_cfg.train_layers > 0:
        text_params = [p for p in model.text.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": text_params, "lr": cfg.lr_text},
                                 {"params": list(model.project.parameters()), "lr": cfg.lr_text * 3}],
                                weight_decay=cfg.weight_decay)
        rng = np.random.default_rng([cfg.seed, 2])
        with bar(f"{name}: stage 2 (fine-tuning {model_cfg.train_layers} encoder layers)", cfg.finetune_steps) as advance:
            for step in range(cfg.finetune_steps):
                if out_of_time():
                    say(f"{name}: time budget: stage 2 ends after {step} steps")
                    break
                searches = rng.choice(rd.train_searches, size=min(cfg.finetune_searches, rd.train_searches),
                                      replace=False)
                rows = torch.from_numpy(np.concatenate([np.arange(rd.search_start[s], rd.search_start[s + 1])
                                                        for s in np.sort(searches)]))
                uq, q_at = torch.unique(query_of[rows], return_inverse=True)
                ui, i_at = torch.unique(item_of[rows], return_inverse=True)
                q = model.encode(texts.queries.get(uq.tolist()).to(torch.device("cpu")))[q_at]
                p = model.encode(texts.items.get(ui.tolist()).to(torch.device("cpu")))[i_at]
                loss, per_head = rk.multitask_loss(model(q, p, feats[rows], tasks), labels[rows], tasks)
                model.zero_grad(set_to_none=True)  # the trunk's gradients too: it is not stepped
                loss.backward()
                torch.nn.utils.clip_grad_norm_(text_params, 5.0)
                opt.step()
                record(2, per_head)
                history["stage2_steps"] += 1
                advance(1)
    return model.eval(), tokenizer, history


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def auc(scores: Sequence[float], labels: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None with one class only."""
    from scipy.stats import rankdata

    labels = np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def page_ndcg(rd: RankerData, scores: np.ndarray, searches: Sequence[int]) -> dict[str, Any]:
    """Mean nDCG@10 of re-ranking each served page by ``scores`` (per row, higher first; ties by
    logged position): purchase (gain 1 per purchase, pages with one) and graded (gains clicked 1,
    carted 2, purchased 3, pages with a click)."""
    purchase, graded = [], []
    for s in searches:
        rows = range(rd.search_start[s], rd.search_start[s + 1])
        ranked = [str(r) for r in sorted(rows, key=lambda r: (-scores[r], rd.position[r]))]
        gains = {str(r): max(0, int(rd.level[r]) - 1) for r in rows}
        if any(g == 3 for g in gains.values()):
            purchase.append(ndcg_at(ranked, {r: int(g == 3) for r, g in gains.items()}, 10))
        if any(g > 0 for g in gains.values()):
            graded.append(ndcg_at(ranked, gains, 10))
    return {"ndcg@10_purchase": float(np.mean(purchase)) if purchase else None, "pages_with_purchase": len(purchase),
            "ndcg@10_graded": float(np.mean(graded)) if graded else None, "pages_with_click": len(graded)}


def head_aucs(probs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, float | None]:
    """AUC of each head's probability against its own labels; a model without a head (the click
    baseline) is scored with its click probability, its only signal."""
    return {t: auc(probs.get(t, probs["click"]), labels[:, j]) for j, t in enumerate(rk.TASKS)}


@torch.no_grad()
def score_rows(ranker: rk.Ranker, rd: RankerData, rows: np.ndarray, batch: int = 4096) -> dict[str, np.ndarray]:
    """Head probabilities and the score for rows, batched (the same model as ``Ranker.score``;
    training's quick test metrics)."""
    used_q = np.unique(rd.query[rows])
    q_vec = torch.zeros(len(rd.query_texts), ranker.cfg.dim)
    q_vec[torch.from_numpy(used_q)] = ranker.encode_texts([rd.query_texts[k] for k in used_q])
    p_vec = ranker.item_vectors([rd.items[i] for i in rd.item_ids])
    w = ranker.weights()
    out = {t: np.zeros(len(rows), np.float32) for t in (*ranker.tasks, "score")}
    for start in range(0, len(rows), batch):
        r = rows[start:start + batch]
        probs = torch.sigmoid(ranker.model(q_vec[rd.query[r]], p_vec[rd.item[r]], torch.from_numpy(rd.features[r]),
                                           ranker.tasks)).numpy()
        for j, t in enumerate(ranker.tasks):
            out[t][start:start + len(r)] = probs[:, j]
            out["score"][start:start + len(r)] += w[t] * probs[:, j]
    return out


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _bar(progress_factory: Callable | None) -> Callable:
    return progress_factory or (lambda label, total: nullcontext(lambda n=1: None))


def fingerprint(rd: RankerData, model_cfg: rk.RankerConfig, cfg: RankerTrainConfig) -> str:
    parts = {"data": rd.name, "items": len(rd.items), "searches": len(rd.search_ids), "rows": rd.rows,
             "model": model_cfg.to_json(), "train": {k: v for k, v in asdict(cfg).items() if k != "max_minutes"}}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()


def train(data_dir: Path, feedback_dir: Path, out_root: Path, version: str | None = None,
          model_cfg: rk.RankerConfig | None = None, cfg: RankerTrainConfig | None = None, baseline: bool = True,
          say: Callable[[str], None] = print, progress_factory: Callable | None = None) -> Path:
    """Train the multi-task ranker (and the click baseline) and write the artifact; returns its dir."""
    started = time.monotonic()
    model_cfg, cfg = model_cfg or rk.RankerConfig(), cfg or RankerTrainConfig()
    bar = _bar(progress_factory)
    rd = prepare(Path(data_dir), Path(feedback_dir), cfg.test_fraction, cfg.stats_window_hours, say=say,
                 random_negatives=cfg.random_negatives, seed=cfg.seed)
    train_rows, test_rows = rd.split_rows("train"), rd.split_rows("test")
    say(f"data: {rd.name}: {len(rd.items)} items; feedback {feedback_dir}: {len(rd.search_ids)} searches, "
        f"{rd.rows} rows; train {rd.train_searches} searches ({len(train_rows)} rows), "
        f"test {len(rd.search_ids) - rd.train_searches} ({len(test_rows)} rows)")
    out_dir = Path(out_root) / (version or f"{rd.name}-{fingerprint(rd, model_cfg, cfg)}")
    torch.manual_seed(cfg.seed)
    texts = cache_texts(rd, model_cfg, cfg, bar)

    plan = [(out_dir, model_cfg)]
    if baseline:
        plan.append((out_dir / rk.BASELINE_DIR, rk.RankerConfig(**{**model_cfg.to_json(), "tasks": ("click",)})))
    results = {}
    for k, (where, mcfg) in enumerate(plan):
        deadline = None
        if cfg.max_minutes is not None:  # each model left gets an equal share of the time left
            left = started + cfg.max_minutes * 60 - time.monotonic()
            deadline = time.monotonic() + max(0.0, left) / (len(plan) - k) - 30  # keep time to write
        fit_started = time.monotonic()
        model, tokenizer, history = fit(rd, texts, mcfg, cfg, deadline, say, bar)
        minutes = (time.monotonic() - fit_started) / 60
        results[where] = write_artifact(rd, model, tokenizer, where, cfg, history, minutes, Path(data_dir),
                                        Path(feedback_dir), bar)
        aucs = results[where]["test_auc"]
        say(f"{'+'.join(mcfg.tasks)}: test AUC " + ", ".join(f"{t} {v:.4f}" for t, v in aucs.items() if v is not None))
    say(f"wrote {out_dir} in {(time.monotonic() - started) / 60:.1f} min")
    return out_dir


def write_artifact(rd: RankerData, model: rk.RankerModel, tokenizer: Any, out_dir: Path, cfg: RankerTrainConfig,
                   history: dict[str, Any], minutes: float, data_dir: Path, feedback_dir: Path,
                   bar: Callable) -> dict[str, Any]:
    last = rd.train_searches - 1
    split = {"train_until": [rd.search_times[last].isoformat(), rd.search_ids[last]],
             "train_searches": rd.train_searches, "test_searches": len(rd.search_ids) - rd.train_searches}
    rk.save(model, tokenizer, out_dir, {"training": asdict(cfg), "split": split})
    ranker = rk.Ranker(model, tokenizer, out_dir.name)
    items = [rd.items[i] for i in rd.item_ids]
    texts = [rk.product_text(it) for it in items]
    vectors = np.zeros((len(texts), model.cfg.dim), dtype=np.float32)
    with bar("encoding the catalog", len(texts)) as advance:
        for start in range(0, len(texts), cfg.encode_batch):
            vectors[start:start + cfg.encode_batch] = ranker.encode_texts(texts[start:start + cfg.encode_batch]).numpy()
            advance(len(texts[start:start + cfg.encode_batch]))
    rk.save_catalog(out_dir, items, vectors)
    ranker.remember(rd.item_ids, [rk.text_hash(t) for t in texts], vectors)
    test_rows = rd.split_rows("test")
    probs = score_rows(ranker, rd, test_rows)
    labels = rk.labels_from_level(rd.level[test_rows])
    metrics = {
        "data": {"name": rd.name, "dir": str(data_dir), "items": len(rd.items), "feedback_dir": str(feedback_dir),
                 "searches": len(rd.search_ids), "rows": rd.rows, **split,
                 "train_rows": int(len(rd.split_rows("train"))), "test_rows": int(len(test_rows)),
                 "test_from": rd.search_times[rd.train_searches].isoformat() if len(test_rows) else None},
        "tasks": list(model.cfg.tasks), "steps": {"stage1": history["stage1_steps"], "stage2": history["stage2_steps"]},
        "minutes": round(minutes, 2),
        "final_losses": {k: float(np.mean(v[-50:])) for k, v in history["losses"].items()},
        "test_auc": {t: a for t, a in head_aucs(probs, labels).items() if t in model.cfg.tasks},
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "MODEL_CARD.md").write_text(model_card(out_dir.name, model.cfg, cfg, metrics))
    if cfg.export_onnx:
        rk.export_query_encoder(out_dir)
    return metrics


def model_card(version: str, m: rk.RankerConfig, cfg: RankerTrainConfig, metrics: dict[str, Any]) -> str:
    d = metrics["data"]
    aucs = " | ".join(f"{v:.4f}" if v is not None else "-" for v in metrics["test_auc"].values())
    losses = ", ".join(f"{k} {v:.4f}" for k, v in metrics["final_losses"].items())
    kind = "multi-task" if len(m.tasks) > 1 else "single-task click baseline"
    return f"""# tailbridge ranker `{version}` ({kind})

Siamese text encoder (all-MiniLM-L6-v2 cut to {m.layers} layers, top {m.train_layers} fine-tuned, {m.max_length}
tokens, shared {m.dim}-d projection) over the query and the product (title, brand, leaf category); an MLP trunk
({m.hidden} wide) over [q, p, q*p] + item behaviour ({', '.join(rk.ITEM_FEATURES)}) + user-item features
({', '.join(rk.USER_FEATURES)}); heads trained: {', '.join(m.tasks)}.
Score = {' + '.join(f'{m.weights[t]:g} * p({t})' for t in m.tasks)} (weights overridable at scoring time).

## Data
- Catalog `{d['name']}` ({d['dir']}): {d['items']} items.
- Feedback log {d['feedback_dir']}: {d['searches']} searches, {d['rows']} rows. Split by time: the first
  {d['train_searches']} searches train ({d['train_rows']} rows, until {d['train_until'][0]}); the last
  {d['test_searches']} ({d['test_rows']} rows, from {d['test_from']}) are the test split.
- Point-in-time features: item stats over the {cfg.stats_window_hours:g} h before each search (earlier searches only),
  user context from the shopper's engagements before it.

## Training
- Stage 1 (encoder frozen): {cfg.epochs} epochs, {metrics['steps']['stage1']} steps of {cfg.batch_size} rows.
  Stage 2 (top {m.train_layers} encoder layers fine-tuned): {metrics['steps']['stage2']} steps of
  {cfg.finetune_searches} searches. Seed {cfg.seed}. {metrics['minutes']} min.
- Final losses (BCE, mean of the last 50 steps): {losses}.

## Test AUC (the time-split test rows)
| {' | '.join(metrics['test_auc'])} |
|{'---|' * len(metrics['test_auc'])}
| {aucs} |

`tailbridge eval ranker` adds nDCG@10 per page against the click baseline and the logged order.
"""


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

SYSTEMS = ("multi-task", "click-only", "logged order")


def evaluate(data_dir: Path, model_dir: Path, feedback_dir: Path, say: Callable[[str], None] = print,
             progress_factory: Callable | None = None, latency_calls: int = 200) -> dict[str, Any]:
    """Score the test split with the model (and its click baseline when present) through
    ``Ranker.score``; write ``eval-ranker.json`` into ``model_dir``. See the module docstring."""
    bar = _bar(progress_factory)
    model_dir = Path(model_dir)
    config = json.loads((model_dir / rk.CONFIG_FILE).read_text())
    train_cfg = config.get("training", {})
    rd = prepare(Path(data_dir), Path(feedback_dir), window_hours=train_cfg.get("stats_window_hours", 24.0),
                 test_after=tuple(config["split"]["train_until"]), say=say)
    test = list(range(rd.train_searches, len(rd.search_ids)))
    if not test:
        raise RankerTrainingError(f"{feedback_dir}: no logged search after the model's training data "
                                  f"(trained until {config['split']['train_until'][0]})")
    rows = rd.split_rows("test")
    labels = rk.labels_from_level(rd.level[rows])
    models = {"multi-task": rk.load(model_dir)}
    if (model_dir / rk.BASELINE_DIR / rk.CONFIG_FILE).is_file():
        models["click-only"] = rk.load(model_dir / rk.BASELINE_DIR)
    else:
        say(f"no click baseline in {model_dir / rk.BASELINE_DIR} (trained with --no-baseline): not compared")

    report: dict[str, Any] = {
        "model": model_dir.name, "data": rd.name, "feedback_dir": str(feedback_dir),
        "test": {"searches": len(test), "rows": int(len(rows)), "from": rd.search_times[test[0]].isoformat(),
                 "to": rd.search_times[test[-1]].isoformat(),
                 **{f"rows_{t}": int(labels[:, j].sum()) for j, t in enumerate(rk.TASKS)}},
        "weights": models["multi-task"].weights(), "systems": {},
    }
    for name, ranker in models.items():
        probs = {t: np.zeros(rd.rows, np.float32) for t in (*ranker.tasks, "score")}
        with bar(f"{name}: scoring {len(test)} test pages", len(test)) as advance:
            for s in test:
                start, end = rd.search_start[s], rd.search_start[s + 1]
                for r, out in zip(range(start, end), ranker.score(rd.query_texts[rd.query[start]], rd.candidates(s),
                                                                  rd.contexts[s])):
                    for k, v in out.items():
                        probs[k][r] = v
                advance(1)
        report["systems"][name] = {
            "auc": head_aucs({t: v[rows] for t, v in probs.items()}, labels),
            "auc_of_score": {t: auc(probs["score"][rows], labels[:, j]) for j, t in enumerate(rk.TASKS)},
            **page_ndcg(rd, probs["score"], test),
        }
    logged = -rd.position.astype(np.float32)
    report["systems"]["logged order"] = {
        "auc": {t: auc(logged[rows], labels[:, j]) for j, t in enumerate(rk.TASKS)},
        **page_ndcg(rd, logged, test),
    }
    report["latency_ms"] = score_latency(models["multi-task"], rd, test, latency_calls)
    (model_dir / "eval-ranker.json").write_text(json.dumps(report, indent=2))
    return report


def score_latency(ranker: rk.Ranker, rd: RankerData, test: Sequence[int], calls: int = 200,
                  candidates: int = 100) -> dict[str, Any]:
    """``Ranker.score`` over ``candidates`` cached catalog products (random stats, a real user
    context) on one thread: p50/p99 over ``calls`` calls, each with a query not seen before (the
    query encode included) and again with the query cached; and the query encode alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(7)
        texts = [rd.query_texts[k] for k in rng.permutation(len(rd.query_texts))]
        queries = [texts[k % len(texts)] + ("" if k < len(texts) else f" {k}") for k in range(calls)]
        contexts = [rd.contexts[test[k % len(test)]] for k in range(calls)]
        pages = [[candidate(rd.items[rd.item_ids[i]], rd.stats[rng.integers(rd.rows)])
                  for i in rng.choice(len(rd.item_ids), candidates, replace=False)] for _ in range(calls)]
        ranker.score(queries[0], pages[0], contexts[0])  # warm-up
        ranker.queries = rk.LRU(ranker.queries.size)

        def timed(fn) -> list[float]:
            out = []
            for k in range(calls):
                began = time.perf_counter()
                fn(k)
                out.append((time.perf_counter() - began) * 1000)
            return out

        cold = timed(lambda k: ranker.score(queries[k], pages[k], contexts[k]))
        warm = timed(lambda k: ranker.score(queries[k], pages[k], contexts[k]))
        ranker.queries = rk.LRU(ranker.queries.size)
        encode = timed(lambda k: ranker.query_vector(queries[k]))  # each a cache miss

        def pct(xs: list[float]) -> dict[str, float]:
            return {"p50": round(float(np.percentile(xs, 50)), 3), "p99": round(float(np.percentile(xs, 99)), 3)}

        return {"candidates": candidates, "calls": calls, "threads": 1, "new_query": pct(cold),
                "cached_query": pct(warm), "query_encode": pct(encode),
                "query_encoder": "onnxruntime" if ranker.onnx is not None else "torch"}
    finally:
        torch.set_num_threads(threads)
