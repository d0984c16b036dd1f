"""Training the multi-task ranker: ``tailbridge train ranker``.

The rows, their point-in-time features and the time split come from ``models.ranking.dataset``.

The loss is the cross-entropy of what the log observed: the model's position-free funnel
probabilities times the examination factor of the row's logged position and route
(``models.ranking.model.multitask_loss``); never-shown negatives count as examined.

1. Stage 1: the text encoder frozen, every training row ``epochs`` times: the encodings of
   the log's query texts and of the catalog are computed once, and the shared projection,
   experts, gates, towers and the examination factors learn from them (seconds per epoch).
2. Stage 2: the encoder's top ``train_layers`` and the projection are fine-tuned under the
   trained experts and towers (kept fixed: batches of a few pages would only add noise to them) on
   batches of whole searches (each step encodes its queries and products again; the frozen lower
   layers' outputs are cached, ``models.retrieval.train.TextSource``) for ``finetune_steps``
   steps or the time budget. A step costs about a second on one CPU core, so stage 2 is short by
   default; on the demo data the served pages are nearly all exact matches, so text says little
   within a page and stage 2 changes the test AUCs by less than 0.001 either way.
3. Artifact ``<root>/<version>/``: weights (safetensors), config JSON, tokenizer, the catalog's
   product encodings and price levels, the query encoder as ONNX, ``metrics.json`` (with the
   test AUCs, ``models.ranking.evaluation``'s metric) and ``MODEL_CARD.md``; the comparison
   models (``VARIANTS``: shared-bottom, single-task click, no position model), trained the same
   way on the same rows, in ``baselines/<name>/`` (unless ``baseline=False``).
   ``models.ranking.model.load_ranker`` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from tailbridge.models.ranking import model as rk
from tailbridge.models.ranking.dataset import RankerData, RankerTrainingError, prepare
from tailbridge.models.ranking.evaluation import head_aucs, score_rows
from tailbridge.models.ranking.features import FEATURES, ITEM_FEATURES, USER_FEATURES, Catalog, item_id_of
from tailbridge.models.retrieval.model import TextInput
from tailbridge.vocab import CONVERSION_WINDOW_DAYS

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
    max_minutes: float | None = 14.0  # all models together; stage 2 ends early to finish in time
    # Method 5's lowest level: random catalog items per training search, labelled nothing. Logged
    # pages are ~all relevant, so without them the ranker never learns to push down what
    # retrieval brings in from other categories.
    random_negatives: int = 4
    judged_negatives: int = 2  # items judged complement / irrelevant for the query, where judged
    # Models trained beside the version on the same rows, for `eval ranker` (``VARIANTS``).
    comparisons: tuple[str, ...] = ("shared-bottom", "click-only", "no-position-model")
    encode_batch: int = 256
    export_onnx: bool = True  # the query encoder as ONNX too (what serving runs per search)
    seed: int = 7


# What each comparison model changes in the version's model config.
VARIANTS: dict[str, dict[str, Any]] = {
    "shared-bottom": {"structure": "shared-bottom"},  # one shared MLP instead of gated experts
    "click-only": {"tasks": ("click",)},  # single task
    "no-position-model": {"position_bias": False},  # learns from the biased log as if unbiased
}

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
    name = f"{model_cfg.structure}/{'+'.join(model_cfg.tasks)}" + ("" if model_cfg.position_bias else "/no-position")
    torch.manual_seed(cfg.seed)
    model, tokenizer = rk.build(model_cfg)
    train_rows = rd.split_rows("train")
    if len(train_rows) == 0:
        raise RankerTrainingError("no training searches (the feedback log is too small for the split)")
    # Stage-1 rows: every logged row, then the random negatives (indices past rd.rows).
    feats = torch.from_numpy(np.concatenate([rd.features, rd.random_features]))
    negatives = len(rd.random_item)
    labels = torch.from_numpy(rk.labels_from_level(np.concatenate([rd.level, np.zeros(negatives, int)])))
    query_of = torch.from_numpy(np.concatenate([rd.query, rd.random_query]))
    item_of = torch.from_numpy(np.concatenate([rd.item, rd.random_item]))
    # Training-only inputs of the examination factor: never-shown negatives are position 0.
    position = torch.from_numpy(np.concatenate([rd.position, np.zeros(negatives, int)]).astype(np.int64))
    route = torch.from_numpy(np.concatenate([rd.route, np.zeros(negatives, int)]).astype(np.int64))
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
                loss, per_head = rk.multitask_loss(model(q, p, feats[rows]), labels[rows],
                                                   model.log_examination(position[rows], route[rows]), tasks)
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
                loss, per_head = rk.multitask_loss(model(q, p, feats[rows]), labels[rows],
                                                   model.log_examination(position[rows], route[rows]), tasks)
                model.zero_grad(set_to_none=True)  # the trunk's gradients too: it is not stepped
                loss.backward()
                torch.nn.utils.clip_grad_norm_(text_params, 5.0)
                opt.step()
                record(2, per_head)
                history["stage2_steps"] += 1
                advance(1)
    return model.eval(), tokenizer, history


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def fingerprint(rd: RankerData, model_cfg: rk.RankerConfig, cfg: RankerTrainConfig) -> str:
    parts = {"data": rd.name, "items": len(rd.items), "searches": len(rd.search_ids), "rows": rd.rows,
             "model": model_cfg.to_json(), "train": {k: v for k, v in asdict(cfg).items() if k != "max_minutes"}}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()


def train(data_dir: Path, feedback_dir: Path, out_root: Path, version: str | None = None,
          model_cfg: rk.RankerConfig | None = None, cfg: RankerTrainConfig | None = None, baseline: bool = True,
          say: Callable[[str], None] = print, progress_factory: Callable | None = None) -> Path:
    """Train the multi-task ranker (and, with ``baseline``, the comparison models of
    ``cfg.comparisons`` under ``baselines/``) and write the artifact; returns its dir."""
    started = time.monotonic()
    model_cfg, cfg = model_cfg or rk.RankerConfig(), cfg or RankerTrainConfig()
    bar = progress_factory or (lambda label, total: nullcontext(lambda n=1: None))
    rd = prepare(Path(data_dir), Path(feedback_dir), cfg.test_fraction, cfg.stats_window_hours, say=say,
                 random_negatives=cfg.random_negatives, judged_negatives=cfg.judged_negatives, seed=cfg.seed)
    model_cfg = rk.RankerConfig(**{**model_cfg.to_json(), "routes": rd.routes})
    train_rows, test_rows = rd.split_rows("train"), rd.split_rows("test")
    say(f"data: {rd.name}: {len(rd.items)} items; feedback {feedback_dir}: {len(rd.search_ids)} searches, "
        f"{rd.rows} rows; train {rd.train_searches} searches ({len(train_rows)} rows), "
        f"test {len(rd.search_ids) - rd.train_searches} ({len(test_rows)} rows)")
    out_dir = Path(out_root) / (version or f"{rd.name}-{fingerprint(rd, model_cfg, cfg)}")
    torch.manual_seed(cfg.seed)
    texts = cache_texts(rd, model_cfg, cfg, bar)

    plan = [(out_dir, model_cfg)]
    unknown = sorted(set(cfg.comparisons) - set(VARIANTS))
    if unknown:
        raise RankerTrainingError(f"unknown comparison models {unknown} (known: {', '.join(VARIANTS)})")
    for name in cfg.comparisons if baseline else ():
        plan.append((out_dir / rk.BASELINES_DIR / name, rk.RankerConfig(**{**model_cfg.to_json(), **VARIANTS[name]})))
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
        scored = ", ".join(f"{t} {v:.4f}" for t, v in aucs.items() if v is not None)
        say(f"{where.name}: test AUC {scored or 'none (no task has both outcomes in the test split)'}")
    say(f"wrote {out_dir} in {(time.monotonic() - started) / 60:.1f} min")
    return out_dir


# --------------------------------------------------------------------------------------------
# The artifact
# --------------------------------------------------------------------------------------------


def write_artifact(rd: RankerData, model: rk.RankerModel, tokenizer: Any, out_dir: Path, cfg: RankerTrainConfig,
                   history: dict[str, Any], minutes: float, data_dir: Path, feedback_dir: Path,
                   bar: Callable) -> dict[str, Any]:
    last = rd.train_searches - 1
    split = {"train_until": [rd.search_times[last].isoformat(), rd.search_ids[last]],
             "train_searches": rd.train_searches, "test_searches": len(rd.search_ids) - rd.train_searches}
    save(model, tokenizer, out_dir, {"training": asdict(cfg), "split": split})
    ranker = rk.Ranker(model, tokenizer, out_dir.name)
    items = [rd.items[i] for i in rd.item_ids]
    texts = [rk.product_text(it) for it in items]
    vectors = np.zeros((len(texts), model.cfg.dim), dtype=np.float32)
    with bar("encoding the catalog", len(texts)) as advance:
        for start in range(0, len(texts), cfg.encode_batch):
            vectors[start:start + cfg.encode_batch] = ranker.encode_texts(texts[start:start + cfg.encode_batch]).numpy()
            advance(len(texts[start:start + cfg.encode_batch]))
    save_catalog(out_dir, items, vectors)
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
        export_query_encoder(out_dir)
    return metrics


def save(model: rk.RankerModel, tokenizer: Any, out_dir: Path, extra_config: Mapping[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"ranker": model.cfg.to_json(), "features": list(FEATURES), **(extra_config or {})}
    (out_dir / rk.CONFIG_FILE).write_text(json.dumps(config, indent=2))
    model.text.bert.config.save_pretrained(out_dir / "text")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / rk.WEIGHTS_FILE))


def save_catalog(out_dir: Path, items: Sequence[Mapping[str, Any]], vectors: np.ndarray) -> None:
    """The catalog's product encodings (keyed by id and text hash), and what ``Catalog`` keeps."""
    np.save(out_dir / rk.ITEM_ENCODINGS_FILE, np.asarray(vectors, dtype=np.float32))
    index = {"item_ids": [item_id_of(it) for it in items],
             "text_hashes": [rk.text_hash(rk.product_text(it)) for it in items]}
    (out_dir / rk.ITEM_INDEX_FILE).write_text(json.dumps(index))
    (out_dir / rk.CATALOG_FILE).write_text(json.dumps(Catalog.from_items(items).to_json()))


class _QueryEncoder(nn.Module):
    def __init__(self, model: rk.RankerModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(TextInput(input_ids, attention_mask))


def export_query_encoder(model_dir: Path) -> Path:
    """Write the query side (tokens -> encoding) as ONNX into the artifact, from the saved weights
    (a fresh copy: ``torch.onnx.export`` can leave the module it traced changed)."""
    import warnings

    model_dir = Path(model_dir)
    ranker = rk.load(model_dir)
    example = ranker.tokenize(["wireless earbuds under $50", "sofa"])  # padding in the example: no branch traced away
    path = model_dir / rk.QUERY_ONNX_FILE
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent branches in transformers
        torch.onnx.export(_QueryEncoder(ranker.model), (example.input_ids, example.attention_mask), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["vectors"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "vectors": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


def model_card(version: str, m: rk.RankerConfig, cfg: RankerTrainConfig, metrics: dict[str, Any]) -> str:
    d = metrics["data"]
    aucs = " | ".join(f"{v:.4f}" if v is not None else "-" for v in metrics["test_auc"].values())
    losses = ", ".join(f"{k} {v:.4f}" for k, v in metrics["final_losses"].items())
    kind = "multi-task" if len(m.tasks) > 1 else "single-task click baseline"
    return f"""# tailbridge ranker `{version}` ({kind})

Siamese text encoder (all-MiniLM-L6-v2 cut to {m.layers} layers, top {m.train_layers} fine-tuned, {m.max_length}
tokens, shared {m.dim}-d projection) over the query and the product (title, brand, leaf category); an MLP trunk
({m.hidden} wide) over [q, p, q*p] + item behaviour ({', '.join(ITEM_FEATURES)}) + user-item features
({', '.join(USER_FEATURES)}); heads trained: {', '.join(m.tasks)}.
Score = {' + '.join(f'{m.weights[t]:g} * p({t})' for t in m.tasks)} (weights overridable at scoring time).

## Data
- Catalog `{d['name']}` ({d['dir']}): {d['items']} items.
- Feedback log {d['feedback_dir']}: {d['searches']} searches, {d['rows']} rows. Split by time: the first
  {d['train_searches']} searches train ({d['train_rows']} rows, until {d['train_until'][0]}); the last
  {d['test_searches']} ({d['test_rows']} rows, from {d['test_from']}) are the test split.
- Point-in-time features: item stats over the {cfg.stats_window_hours:g} h (conversion per click: {CONVERSION_WINDOW_DAYS}
  days) before each search (earlier searches only), user context from the shopper's engagements before it.

## Training
- Stage 1 (encoder frozen): {cfg.epochs} epochs, {metrics['steps']['stage1']} steps of {cfg.batch_size} rows.
  Stage 2 (top {m.train_layers} encoder layers fine-tuned): {metrics['steps']['stage2']} steps of
  {cfg.finetune_searches} searches. Seed {cfg.seed}. {metrics['minutes']} min.
- Final losses (BCE, mean of the last 50 steps): {losses}.

## Test AUC (the time-split test rows)
| {' | '.join(metrics['test_auc'])} |
|{'---|' * len(metrics['test_auc'])}
| {aucs} |

These AUCs are on logged labels, whose clicks follow the logged position as much as the item.
`tailbridge eval ranker` adds nDCG@10 of the test pages re-ranked (logged labels, and IPS with the learned
examination) against the comparison models and the logged order; on simulated data also the counterfactual
metrics (the simulator's true position-free p(purchase) as each item's gain: expected purchase nDCG@10 and
expected purchases per page), which the logged order's position advantage does not enter.
"""
