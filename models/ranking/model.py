"""The multi-task product ranker (method 2 of docs/DESIGN.md), read top to bottom.

    query ─── MiniLM (first `layers` layers) ─ mean pool ─ shared projection ─ q ─┐
    product text ─── the same weights ───────────────────────────────────────── p ─┤
    (title. brand. leaf category)                                                  ├─ x = [q, p, q*p, features]
    query x item: term match, asked-for values, price cap ─────────────────────────┤
    item behaviour (Feast item_stats): ctr_24h, cvr_24h, log1p(purchases_24h),     │
      conversion per click over 7 days: cart_rate_7d, cvr_7d ──────────────────────┤
    user x item (Feast user_context): category affinity, recently engaged, price    │
      level against the user's recent items, brand share ──────────────────────────┘
    x ─ experts E_1..E_k (MLPs) ─ per-task softmax gate over the experts (MMoE) ─ task tower ─ logit
    funnel (ESMM): p(click) = σ(l_click), p(cart) = p(click)·σ(l_cart|click),
                   p(purchase) = p(cart)·σ(l_purchase|cart)
    training only (PAL): p(observed click at position k, route r) = exam(k, r) · p(click), and the
      same factor on cart and purchase (they need the click); exam is a learned table, dropped at
      serving, where the score is the position-free p(...).
    score = sum over heads of weight[head] · p(head)   (weights: click 1, add_to_cart 2, purchase 4)

Design choices, briefly:
* Siamese, late interaction: the query and the product are encoded separately by the SAME
  encoder and only meet in the MLP, so a product's encoding is computed once per item (the
  artifact ships the training catalog's, an LRU keeps the rest, keyed by the text's hash) and a
  search costs one short query encode plus small MLPs over the candidates. What late
  interaction cannot do (check a price cap, a colour) comes in as query x item features.
* Position-biased logs: the logged pages were ordered by an earlier ranker and shoppers look at
  the top more, so a click says "relevant AND looked at". The examination factor explains the
  position part during training and is not there at serving (position-aware learning, "PAL"),
  so the towers learn the position-free part. Random catalog negatives (never shown) count as
  examined: nobody would have clicked them.
* Multi-task: experts shared by the heads, each head mixing them through its own gate (MMoE;
  ``structure="shared-bottom"`` is one wider shared MLP instead, for comparison), and the
  funnel: a cart needs a click and a purchase a cart, so the cart and purchase towers learn
  conditional probabilities on the rows where the step before happened while every row's click
  label trains the shared experts, and p(purchase) is a product that the dense click labels
  shape (ESMM's idea). ``tasks`` restricts the model to a prefix of the funnel: ``("click",)``
  is the single-task click baseline.
* User features are all 0 when there is no user, so the anonymous path is the same model.

The dense features are ``models.ranking.features``; ``models.ranking.training`` trains a version
and writes its artifact, which ``load_ranker`` here reads back for serving.
"""

from __future__ import annotations

import json
import math
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tailbridge.models.ranking.features import (FEATURES, Catalog, features, item_id_of, leaf_category, query_view,
                                                user_view)
from tailbridge.models.retrieval.model import TextEncoder, TextInput, load_bert, minilm_path

TASKS = ("click", "add_to_cart", "purchase")
DEFAULT_WEIGHTS = {"click": 1.0, "add_to_cart": 2.0, "purchase": 4.0}

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


STRUCTURES = ("mmoe", "shared-bottom")


@dataclass
class RankerConfig:
    layers: int = 2  # MiniLM layers kept (of 6), for CPU latency
    train_layers: int = 1  # of those, fine-tuned from the top; the rest is frozen
    max_length: int = 32  # tokens per text (query or product)
    dim: int = 128  # shared projection of the pooled text vector
    hidden: int = 128  # width of each expert (shared-bottom: experts x hidden, the same size)
    experts: int = 4
    structure: str = "mmoe"  # or "shared-bottom"
    dropout: float = 0.1
    tasks: tuple[str, ...] = TASKS  # a prefix of the funnel: heads the loss trains (and score uses)
    position_bias: bool = True  # learn an examination factor per logged position (training only)
    positions: int = 10  # positions with their own examination factor; later ones share the last
    routes: tuple[str, ...] = ()  # serving routes in the log (each its own examination offset)
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self) -> None:
        self.tasks, self.routes = tuple(self.tasks), tuple(self.routes)
        if self.tasks != TASKS[:len(self.tasks)] or not self.tasks:
            raise ValueError(f"tasks must be a prefix of the funnel {TASKS}, got {self.tasks}")
        if not 0 <= self.train_layers <= self.layers:
            raise ValueError(f"train_layers must be in 0..layers ({self.layers}), got {self.train_layers}")
        if self.structure not in STRUCTURES or self.experts < 1 or self.positions < 1:
            raise ValueError(f"structure must be one of {STRUCTURES} with experts >= 1 and positions >= 1")
        self.weights = resolve_weights(DEFAULT_WEIGHTS, self.weights)

    def to_json(self) -> dict:
        return asdict(self) | {"tasks": list(self.tasks), "routes": list(self.routes)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RankerConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ranker config keys: {sorted(unknown)}")
        return cls(**data)


def resolve_weights(base: Mapping[str, float], override: Mapping[str, float] | None) -> dict[str, float]:
    """``base`` with the heads named in ``override`` replaced; unknown heads and negative weights
    are errors (a typo would otherwise silently rank by the defaults)."""
    out = {t: float(base.get(t, 0.0)) for t in TASKS}
    for head, weight in (override or {}).items():
        if head not in TASKS:
            raise ValueError(f"unknown ranker head {head!r} in weights (heads: {', '.join(TASKS)})")
        if not math.isfinite(float(weight)) or float(weight) < 0:
            raise ValueError(f"ranker weight for {head} must be a finite number >= 0, got {weight}")
        out[head] = float(weight)
    return out


# --------------------------------------------------------------------------------------------
# Text: what the encoder reads of a product
# --------------------------------------------------------------------------------------------


def product_text(candidate: Mapping[str, Any]) -> str:
    """What the encoder reads of a product: title, brand and leaf category (like
    ``tailbridge.vocab.item_text`` without the description, which rarely fits in 32 tokens)."""
    parts = [candidate.get("title") or "", candidate.get("brand") or "", leaf_category(candidate)]
    return ". ".join(str(p) for p in parts if p)


def text_hash(text: str) -> int:
    return zlib.crc32(text.encode())


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def truncated_bert(layers: int, config_only: bool = False, path: str | Path | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 (offline) cut to its first ``layers`` transformer layers."""
    bert = load_bert(path, config_only=config_only)
    if not 1 <= layers <= len(bert.encoder.layer):
        raise ValueError(f"layers must be in 1..{len(bert.encoder.layer)}, got {layers}")
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    return bert


def _mlp(n_in: int, width: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width), nn.GELU())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's switch at -log 2)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class RankerModel(nn.Module):
    def __init__(self, cfg: RankerConfig, bert: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(bert, cfg.train_layers)  # frozen prefix + trainable top layers, mean pooled
        self.project = nn.Linear(self.text.hidden, cfg.dim)
        n_in = 3 * cfg.dim + len(FEATURES)
        if cfg.structure == "mmoe":
            self.experts = nn.ModuleList(_mlp(n_in, cfg.hidden, cfg.dropout) for _ in range(cfg.experts))
            self.gates = nn.ModuleDict({t: nn.Linear(n_in, cfg.experts) for t in cfg.tasks})
            width = cfg.hidden
        else:  # shared bottom: one MLP as wide as all the experts together
            self.experts = nn.ModuleList([_mlp(n_in, cfg.hidden * cfg.experts, cfg.dropout)])
            width = cfg.hidden * cfg.experts
        self.towers = nn.ModuleDict({t: nn.Sequential(nn.Linear(width, 64), nn.GELU(), nn.Linear(64, 1))
                                     for t in cfg.tasks})
        if cfg.position_bias:
            # exam(k) = sigmoid(position_logit[k] + route_logit[r]); index 0 of positions is
            # "not shown" (random negatives) and is never used: those rows count as examined.
            start = [math.log(k ** -0.5 / (1 - k ** -0.5 + 1e-3)) for k in range(1, cfg.positions + 1)]
            self.position_logit = nn.Parameter(torch.tensor([0.0, *start]))
            self.route_logit = nn.Parameter(torch.zeros(len(cfg.routes) + 1))  # 0: unknown route
        # Standardisation of the dense features, set from the training rows (saved with the weights).
        self.register_buffer("feature_mean", torch.zeros(len(FEATURES)))
        self.register_buffer("feature_std", torch.ones(len(FEATURES)))

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled text vector -> the shared projection, unit length times sqrt(dim) (entries ~1,
        so q*p is on the scale of the other inputs and sum(q*p)/dim is a cosine)."""
        return F.normalize(self.project(pooled), dim=-1) * math.sqrt(self.cfg.dim)

    def encode(self, text: TextInput) -> torch.Tensor:
        return self.embed(self.text(text))

    def forward(self, q: torch.Tensor, p: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Tower logits [B, len(tasks)] for rows of (query vector, product vector, features): the
        first is click, the others conditional on the funnel step before (see ``log_probs``)."""
        x = torch.cat([q, p, q * p, (feats - self.feature_mean) / self.feature_std], dim=-1)
        if self.cfg.structure == "mmoe":
            experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, k, hidden]
            mixed = {t: torch.einsum("bk,bkh->bh", torch.softmax(self.gates[t](x), -1), experts)
                     for t in self.cfg.tasks}
        else:
            shared = self.experts[0](x)
            mixed = {t: shared for t in self.cfg.tasks}
        return torch.cat([self.towers[t](mixed[t]) for t in self.cfg.tasks], dim=-1)

    def log_examination(self, position: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """log exam(position, route) [B]; 0 (examined) for position 0, a never-shown row."""
        if not self.cfg.position_bias:
            return torch.zeros(position.shape, dtype=torch.float32)
        k = position.clamp(0, self.cfg.positions)
        log_exam = F.logsigmoid(self.position_logit[k] + self.route_logit[route])
        return torch.where(position > 0, log_exam, torch.zeros_like(log_exam))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Tower logits [B, T] -> log p(click), log p(cart), log p(purchase) [B, T] along the funnel:
    each step's probability is the one before times its conditional."""
    return torch.cumsum(F.logsigmoid(logits), dim=-1)


def labels_from_level(levels: np.ndarray) -> np.ndarray:
    """Feedback label levels (0 random item, 1 shown_unclicked .. 4 purchased) -> [N, 3] targets in
    TASKS order: click = clicked or better, add_to_cart = carted or better, purchase = purchased."""
    levels = np.asarray(levels)
    return np.stack([levels >= 2, levels >= 3, levels >= 4], axis=1).astype(np.float32)


def multitask_loss(logits: torch.Tensor, labels: torch.Tensor, log_exam: torch.Tensor,
                   tasks: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """Sum over the model's heads of the binary cross-entropy of what was OBSERVED:
    p_obs(head) = exam · p(head) along the funnel. ``logits`` [B, len(tasks)], ``labels`` [B, 3]
    in TASKS order, ``log_exam`` [B] (zeros: no position model)."""
    log_p = log_probs(logits) + log_exam[:, None]
    per = {}
    for j, t in enumerate(tasks):
        y = labels[:, TASKS.index(t)]
        per[t] = -(y * log_p[:, j] + (1 - y) * log1mexp(log_p[:, j])).mean()
    return sum(per.values()), per  # type: ignore[return-value]


def build(cfg: RankerConfig) -> tuple[RankerModel, Any]:
    """A fresh model initialised from all-MiniLM-L6-v2 (offline, truncated) and its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    return RankerModel(cfg, truncated_bert(cfg.layers)), tokenizer


# --------------------------------------------------------------------------------------------
# Serving: scoring candidates, with cached product encodings
# --------------------------------------------------------------------------------------------


class LRU:
    """A bounded mapping that forgets the least recently used entry; safe to share between the
    query handler's threads."""

    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence) -> list:
        """The values of ``keys`` (None where absent), under one acquisition of the lock."""
        with self.lock:
            values = [self.data.get(key) for key in keys]
            for key, value in zip(keys, values):
                if value is not None:
                    self.data.move_to_end(key)
            return values

    def put(self, key, value) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)

    def __len__(self) -> int:
        return len(self.data)


class Ranker:
    """A trained ranker version behind the query handler's call, ``score``.

    Product encodings are cached (LRU keyed by item id and the text's hash; the training
    catalog's are loaded from the artifact at start), unseen products are encoded in one batch
    per call, and recent query encodings are cached too."""

    def __init__(self, model: RankerModel, tokenizer: Any, version: str, item_cache_size: int = 200_000,
                 query_cache_size: int = 10_000):
        self.model = model.eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.version = version
        self.tasks = self.cfg.tasks
        self.items = LRU(item_cache_size)  # (item_id, text hash) -> encoding [dim]
        self.queries = LRU(query_cache_size)  # normalised query -> encoding [dim]
        self.catalog = Catalog()  # recent items' prices and brands, category price levels
        self.onnx: Any = None  # onnxruntime session of the query encoder, if the artifact has one

    # ---------------------------------------------------------------- encoding

    def tokenize(self, texts: Sequence[str]) -> TextInput:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt")
        return TextInput(enc["input_ids"], enc["attention_mask"])

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
        out = [self.model.encode(self.tokenize(texts[i:i + batch])) for i in range(0, len(texts), batch)]
        return torch.cat(out) if out else torch.zeros(0, self.cfg.dim)

    def remember(self, item_ids: Sequence[str], hashes: Sequence[int], vectors: torch.Tensor | np.ndarray) -> None:
        vectors = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        for item_id, h, v in zip(item_ids, hashes, vectors):
            self.items.put((str(item_id), int(h)), v)

    def item_vectors(self, candidates: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        keys, texts = [], []
        for c in candidates:
            text = product_text(c)
            keys.append((item_id_of(c), text_hash(text)))
            texts.append(text)
        found = self.items.get_many(keys)
        missing = [i for i, v in enumerate(found) if v is None]
        if missing:  # one batch for everything not cached (each distinct text once)
            unseen = list(dict.fromkeys(texts[i] for i in missing))
            by_text = dict(zip(unseen, self.encode_texts(unseen)))
            for i in missing:
                found[i] = by_text[texts[i]]
                self.items.put(keys[i], found[i])
        return torch.stack(found)

    def query_vector(self, query: str) -> torch.Tensor:
        """The query's encoding: from the cache, else from the ONNX query encoder when the artifact
        has one (same numbers, a few times faster for one short text), else from torch."""
        key = " ".join(query.lower().split())
        vector = self.queries.get(key)
        if vector is None:
            if self.onnx is not None:
                enc = self.tokenizer([query], truncation=True, max_length=self.cfg.max_length, return_tensors="np")
                feed = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
                vector = torch.from_numpy(self.onnx.run(["vectors"], feed)[0][0])
            else:
                vector = self.encode_texts([query])[0]
            self.queries.put(key, vector)
        return vector

    # ---------------------------------------------------------------- scoring

    def weights(self, override: Mapping[str, float] | None = None) -> dict[str, float]:
        return resolve_weights(self.cfg.weights, override)

    def score(self, query: str, candidates: Sequence[Mapping[str, Any]], user_context: Mapping[str, Any] | None = None,
              weights: Mapping[str, float] | None = None) -> list[dict[str, float]]:
        """One dict per candidate, in input order: each trained head's probability and
        ``score`` = sum of weight[head] * probability (weights: the artifact's defaults, with
        the heads in ``weights`` replaced). Probabilities are position-free: what the shopper
        would do were the item examined. Candidates are dicts with item_id, title, brand,
        category / category_path, price and the Feast ``item_stats`` fields
        (``tailbridge.vocab.ITEM_STATS_FIELDS``; missing -> 0);
        ``user_context`` is the Feast ``user_context`` row, None for no user."""
        w = self.weights(weights)
        if not candidates:
            return []
        for c in candidates:  # later users may name these among their recent items
            self.catalog.add(c)
        view, asked = user_view(user_context, self.catalog), query_view(query, self.catalog)
        # Through numpy: torch.tensor reads nested lists element by element (5x slower), same float32 values.
        feats = torch.from_numpy(np.array([features(asked, c, view, self.catalog) for c in candidates], dtype=np.float32))
        with torch.inference_mode():
            p = self.item_vectors(candidates)
            q = self.query_vector(query).expand_as(p)
            probs = torch.exp(log_probs(self.model(q, p, feats))).tolist()
        out = []
        for row in probs:
            heads = dict(zip(self.tasks, row))
            heads["score"] = sum(w[t] * heads[t] for t in self.tasks)
            out.append(heads)
        return out


# --------------------------------------------------------------------------------------------
# Artifacts: the files of a trained version (written by models.ranking.training), and loading one
# --------------------------------------------------------------------------------------------

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
ITEM_ENCODINGS_FILE, ITEM_INDEX_FILE, CATALOG_FILE = "item_encodings.npy", "item_encodings.json", "catalog.json"
QUERY_ONNX_FILE = "query_encoder.onnx"
BASELINES_DIR = "baselines"  # comparison models trained beside a version (one folder each), for the eval


def is_current(model_dir: Path) -> bool:
    """Whether the artifact was trained on the features this code computes (an older ranker's
    cannot be scored by it)."""
    path = Path(model_dir) / CONFIG_FILE
    return path.is_file() and json.loads(path.read_text()).get("features") == list(FEATURES)


def load(model_dir: Path) -> Ranker:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, "text", "tokenizer") if not (model_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: not a ranker artifact (missing {', '.join(missing)})")
    if not is_current(model_dir):
        raise ValueError(f"{model_dir}: trained on other features than this code computes (an older ranker "
                         "version): retrain it with `tailbridge train ranker`")
    cfg = RankerConfig.from_json(json.loads((model_dir / CONFIG_FILE).read_text())["ranker"])
    model = RankerModel(cfg, load_bert(model_dir / "text", config_only=True))
    model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"), local_files_only=True)
    ranker = Ranker(model, tokenizer, model_dir.name)
    vectors, index = model_dir / ITEM_ENCODINGS_FILE, model_dir / ITEM_INDEX_FILE
    if vectors.is_file() and index.is_file():
        meta = json.loads(index.read_text())
        ranker.remember(meta["item_ids"], meta["text_hashes"], np.load(vectors))
    if (model_dir / QUERY_ONNX_FILE).is_file():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # serving runs one request per core
        options.inter_op_num_threads = 1
        ranker.onnx = ort.InferenceSession(str(model_dir / QUERY_ONNX_FILE), options,
                                           providers=["CPUExecutionProvider"])
    if (model_dir / CATALOG_FILE).is_file():
        saved = json.loads((model_dir / CATALOG_FILE).read_text())
        ranker.catalog = Catalog.from_json(saved)
    return ranker


def ranker_root() -> Path:
    from tailbridge.settings import get_settings

    return get_settings().data_dir / "models" / "ranker"


def known_versions(root: Path | None = None) -> list[str]:
    root = root or ranker_root()
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file()) if root.is_dir() else []


def ranker_dir(version_or_path: str | Path) -> Path:
    """A path as given if it is a directory, else DATA_DIR/models/ranker/<version>."""
    path = Path(version_or_path).expanduser()
    return path if path.is_dir() else ranker_root() / str(version_or_path)


def load_ranker(version_or_path: str | Path) -> Ranker:
    """A trained ranker: a version under DATA_DIR/models/ranker, or an artifact path."""
    path = ranker_dir(version_or_path)
    if not (path / CONFIG_FILE).is_file():
        known = ", ".join(known_versions()) or "none (train one with `tailbridge train ranker`)"
        raise ValueError(f"unknown ranker version {str(version_or_path)!r} (no artifact at {path}; known: {known})")
    return load(path)
