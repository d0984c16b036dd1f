"""The multi-task product ranker (method 2 of docs/DESIGN.md), read top to bottom.

    query ───────────── MiniLM (first `layers` layers) ─ mean pool ─ shared projection ─ q ─┐
    product text ────── the same weights ──────────────────────────────────────────────── p ─┤
    (title. brand. leaf category)                                                            ├─ [q, p, q*p, features]
    item behaviour (Feast item_stats / Milvus): ctr_24h, cvr_24h, log1p(purchases_24h) ──────┤    └─ shared MLP trunk
    user x item (Feast user_context): category affinity, recently clicked / carted /         │        ├─ click head
      purchased, log price / median price of the user's recent items ────────────────────────┘        ├─ add-to-cart head
                                                                                                       └─ purchase head
    score = sum over heads of weight[head] * sigmoid(logit[head])   (weights: click 1, add_to_cart 2, purchase 4)

Design choices, briefly:
* Siamese, late interaction: the query and the product are encoded separately by the SAME
  encoder and only meet in the MLP. A cross-encoder over "query [SEP] product" would read both
  together (often a little more accurate), but it must run the transformer once per candidate
  on every search; here a product's encoding does not depend on the query, so it is computed
  once per item (the artifact ships the training catalog's, an LRU keeps the rest, keyed by the
  text's hash so an edited title is re-encoded) and a search costs one short query encode plus
  a small MLP over the candidates. Sharing the weights also halves what is trained and means a
  query and a product that say the same thing start with the same vector.
* CPU latency: only the first ``layers`` (default 2) of all-MiniLM-L6-v2's 6 layers are kept,
  and texts are cut at 32 tokens. Training fine-tunes the top ``train_layers`` of them.
* Multi-task: one trunk, one logit per head, and the loss is the sum of the heads' binary
  cross-entropies (click = clicked or better, add_to_cart = carted or better, purchase =
  purchased). Purchases are rare; the trunk and encoder they share with the dense click
  labels are what lets the purchase head learn from them. ``tasks`` restricts the loss (and
  the returned heads) to a subset: ``("click",)`` is the single-task click baseline.
* Behaviour features are exactly those serving reads from the search hits (the stats the
  stream worker mirrors into Milvus). User features are all 0 when there is no user, so the
  anonymous path is the same model, not a fallback.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
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

from tailbridge.models.retrieval.model import TextEncoder, TextInput, category_affinity, load_bert, minilm_path
from tailbridge.vocab import ENGAGEMENT

TASKS = ("click", "add_to_cart", "purchase")
DEFAULT_WEIGHTS = {"click": 1.0, "add_to_cart": 2.0, "purchase": 4.0}

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class RankerConfig:
    layers: int = 2  # MiniLM layers kept (of 6), for CPU latency
    train_layers: int = 1  # of those, fine-tuned from the top; the rest is frozen
    max_length: int = 32  # tokens per text (query or product)
    dim: int = 128  # shared projection of the pooled text vector
    hidden: int = 256  # MLP trunk width
    dropout: float = 0.1
    tasks: tuple[str, ...] = TASKS  # heads the loss trains (and score uses)
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if not 0 <= self.train_layers <= self.layers:
            raise ValueError(f"train_layers must be in 0..layers ({self.layers}), got {self.train_layers}")
        self.weights = resolve_weights(DEFAULT_WEIGHTS, self.weights)

    def to_json(self) -> dict:
        return asdict(self) | {"tasks": list(self.tasks)}

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
# Features: what a candidate and the shopper's context contribute besides the text
# --------------------------------------------------------------------------------------------

ITEM_FEATURES = ("ctr_24h", "cvr_24h", "log1p_purchases_24h")
USER_FEATURES = ("has_user", "category_affinity", "recently_clicked", "recently_carted", "recently_purchased",
                 "log_price_vs_recent_median", "price_level_vs_recent", "abs_price_level_vs_recent", "brand_share")
FEATURES = ITEM_FEATURES + USER_FEATURES
PRICE_RATIO_CLIP = 3.0
PRICE_QUANTILES = 21


def _number(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) else 0.0


def item_id_of(candidate: Mapping[str, Any]) -> str:
    return str(candidate.get("item_id", candidate.get("id", "")))


def leaf_category(candidate: Mapping[str, Any]) -> str:
    """The leaf category: ``category`` (as Milvus holds it) or the last step of ``category_path``
    (a list, or a string "A > B")."""
    if candidate.get("category"):
        return str(candidate["category"])
    path = candidate.get("category_path") or []
    if isinstance(path, str):
        path = [p.strip() for p in path.split(">") if p.strip()]
    return str(path[-1]) if path else ""


def product_text(candidate: Mapping[str, Any]) -> str:
    """What the encoder reads of a product: title, brand and leaf category (like
    ``tailbridge.vocab.item_text`` without the description, which rarely fits in 32 tokens)."""
    parts = [candidate.get("title") or "", candidate.get("brand") or "", leaf_category(candidate)]
    return ". ".join(str(p) for p in parts if p)


def text_hash(text: str) -> int:
    return zlib.crc32(text.encode())


def item_features(candidate: Mapping[str, Any]) -> list[float]:
    """The item's behaviour stats as the Feast ``item_stats`` view and the Milvus hit hold them
    (missing -> 0); the purchase count is log1p'd."""
    return [_number(candidate.get("ctr_24h")), _number(candidate.get("cvr_24h")),
            math.log1p(max(0.0, _number(candidate.get("purchases_24h"))))]


class Catalog:
    """What the ranker knows of products beyond a candidate's own fields: price, brand and leaf
    category per item id (a user context names its recent items by id only), and each leaf
    category's price quantiles, so a price can be read as a level within its category (0 = the
    category's cheapest, 1 = its dearest) and compared across categories. Filled from the
    training catalog and then from every candidate scored."""

    def __init__(self, quantiles: Mapping[str, Sequence[float]] | None = None):
        self.quantiles = {c: [float(x) for x in q] for c, q in (quantiles or {}).items()}  # log-price quantiles
        self.items: dict[str, tuple[float, str, str]] = {}  # item id -> (price, brand, leaf category)

    @classmethod
    def from_items(cls, items: Sequence[Mapping[str, Any]]) -> Catalog:
        by_leaf: dict[str, list[float]] = {}
        for it in items:
            if _number(it.get("price")) > 0:
                by_leaf.setdefault(leaf_category(it), []).append(math.log(_number(it.get("price"))))
        cat = cls({c: np.quantile(v, np.linspace(0, 1, PRICE_QUANTILES)).tolist()
                   for c, v in sorted(by_leaf.items()) if len(v) >= 5})
        for it in items:
            cat.add(it)
        return cat

    def add(self, candidate: Mapping[str, Any]) -> None:
        self.items[item_id_of(candidate)] = (_number(candidate.get("price")), str(candidate.get("brand") or ""),
                                             leaf_category(candidate))

    def price_level(self, leaf: str, price: float) -> float | None:
        """Piecewise-linear position of the log price among the category's quantiles, in 0..1
        (plain Python: it runs for every candidate of every search)."""
        q = self.quantiles.get(leaf)
        if q is None or price <= 0:
            return None
        x = math.log(price)
        if x <= q[0]:
            return 0.0
        if x >= q[-1]:
            return 1.0
        k = bisect.bisect_right(q, x) - 1  # q[k] <= x < q[k + 1], so the span is > 0
        return (k + (x - q[k]) / (q[k + 1] - q[k])) / (len(q) - 1)

    def to_json(self) -> dict[str, list[float]]:
        return {c: [round(x, 6) for x in q] for c, q in self.quantiles.items()}


@dataclass
class UserView:
    """A Feast ``user_context`` row digested once per search for the per-candidate features."""

    affinity: dict[str, float]  # category -> weight (sums to 1 as the stream worker writes it)
    level: dict[str, int]  # recent item -> strongest engagement (1 click, 2 cart, 3 purchase)
    median_price: float  # of the recent items with a known price, 0 if none
    median_price_level: float | None  # of the recent items' price levels in their categories
    brand_share: dict[str, float]  # brand -> share of the recent items with a known brand


def user_view(context: Mapping[str, Any] | None, catalog: Catalog) -> UserView | None:
    """None without a user. Recent items the catalog does not know add no price or brand."""
    if not context:
        return None
    level: dict[str, int] = {}
    ids = [str(i) for i in (context.get("recent_item_ids") or [])]
    actions = list(context.get("recent_actions") or [])
    for item_id, action in zip(ids, actions):
        level[item_id] = max(level.get(item_id, 0), ENGAGEMENT.get(str(action), 0))
    known = [catalog.items[i] for i in dict.fromkeys(ids) if i in catalog.items]
    prices = [price for price, _, _ in known if price > 0]
    levels = [x for x in (catalog.price_level(leaf, price) for price, _, leaf in known) if x is not None]
    brands = [brand for _, brand, _ in known if brand]
    return UserView(category_affinity(context), level, statistics.median(prices) if prices else 0.0,
                    statistics.median(levels) if levels else None,
                    {b: brands.count(b) / len(brands) for b in set(brands)})


def user_item_features(candidate: Mapping[str, Any], view: UserView | None, catalog: Catalog) -> list[float]:
    """How this shopper relates to this item: affinity to its leaf category, whether they recently
    clicked / carted / bought it, its price against their recent items' (log ratio to the median
    price, and the gap between price levels within categories), and the share of their recent
    items of its brand. All 0 without a user; a feature without the data for it is 0."""
    if view is None:
        return [0.0] * len(USER_FEATURES)
    level = view.level.get(item_id_of(candidate), 0)
    price, leaf = _number(candidate.get("price")), leaf_category(candidate)
    ratio = 0.0
    if price > 0 and view.median_price > 0:
        ratio = max(-PRICE_RATIO_CLIP, min(PRICE_RATIO_CLIP, math.log(price / view.median_price)))
    item_level = catalog.price_level(leaf, price)
    gap = 0.0 if item_level is None or view.median_price_level is None else item_level - view.median_price_level
    return [1.0, view.affinity.get(leaf, 0.0), float(level >= 1), float(level >= 2), float(level >= 3), ratio,
            gap, abs(gap), view.brand_share.get(str(candidate.get("brand") or ""), 0.0)]


def features(candidate: Mapping[str, Any], view: UserView | None, catalog: Catalog) -> list[float]:
    return item_features(candidate) + user_item_features(candidate, view, catalog)


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


class RankerModel(nn.Module):
    def __init__(self, cfg: RankerConfig, bert: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(bert, cfg.train_layers)  # frozen prefix + trainable top layers, mean pooled
        self.project = nn.Linear(self.text.hidden, cfg.dim)
        self.trunk = nn.Sequential(
            nn.Linear(3 * cfg.dim + len(FEATURES), cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
        )
        self.heads = nn.ModuleDict({t: nn.Linear(cfg.hidden, 1) for t in TASKS})
        # Standardisation of the dense features, set from the training rows (saved with the weights).
        self.register_buffer("feature_mean", torch.zeros(len(FEATURES)))
        self.register_buffer("feature_std", torch.ones(len(FEATURES)))

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled text vector -> the shared projection, unit length times sqrt(dim) (entries ~1,
        so q*p is on the scale of the other inputs and sum(q*p)/dim is a cosine)."""
        return F.normalize(self.project(pooled), dim=-1) * math.sqrt(self.cfg.dim)

    def encode(self, text: TextInput) -> torch.Tensor:
        return self.embed(self.text(text))

    def forward(self, q: torch.Tensor, p: torch.Tensor, feats: torch.Tensor,
                tasks: Sequence[str] = TASKS) -> torch.Tensor:
        """Logits [B, len(tasks)] for rows of (query vector, product vector, features)."""
        x = torch.cat([q, p, q * p, (feats - self.feature_mean) / self.feature_std], dim=-1)
        h = self.trunk(x)
        return torch.cat([self.heads[t](h) for t in tasks], dim=-1)


def labels_from_level(levels: np.ndarray) -> np.ndarray:
    """Feedback label levels (1 shown_unclicked .. 4 purchased) -> [N, 3] targets in TASKS order:
    click = clicked or better, add_to_cart = carted or better, purchase = purchased."""
    levels = np.asarray(levels)
    return np.stack([levels >= 2, levels >= 3, levels >= 4], axis=1).astype(np.float32)


def multitask_loss(logits: torch.Tensor, labels: torch.Tensor, tasks: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """Sum of per-head BCE. ``logits`` [B, len(tasks)] (the model's columns for ``tasks``),
    ``labels`` [B, 3] in TASKS order; heads outside ``tasks`` contribute nothing."""
    per = {t: F.binary_cross_entropy_with_logits(logits[:, j], labels[:, TASKS.index(t)])
           for j, t in enumerate(tasks)}
    return sum(per.values()), per  # type: ignore[return-value]


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
        with self.lock:
            value = self.data.get(key)
            if value is not None:
                self.data.move_to_end(key)
            return value

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
        found = [self.items.get(k) for k in keys]
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
        the heads in ``weights`` replaced). Candidates are dicts with item_id, title, brand,
        category / category_path, price and the stats ctr_24h, cvr_24h, purchases_24h (missing -> 0);
        ``user_context`` is the Feast ``user_context`` row, None for no user."""
        w = self.weights(weights)
        if not candidates:
            return []
        for c in candidates:  # later users may name these among their recent items
            self.catalog.add(c)
        view = user_view(user_context, self.catalog)
        feats = torch.tensor([features(c, view, self.catalog) for c in candidates], dtype=torch.float32)
        with torch.inference_mode():
            p = self.item_vectors(candidates)
            q = self.query_vector(query).expand_as(p)
            probs = torch.sigmoid(self.model(q, p, feats, self.tasks)).tolist()
        out = []
        for row in probs:
            heads = dict(zip(self.tasks, row))
            heads["score"] = sum(w[t] * heads[t] for t in self.tasks)
            out.append(heads)
        return out


# --------------------------------------------------------------------------------------------
# Artifacts: save and load a trained version
# --------------------------------------------------------------------------------------------

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
ITEM_ENCODINGS_FILE, ITEM_INDEX_FILE, CATALOG_FILE = "item_encodings.npy", "item_encodings.json", "catalog.json"
QUERY_ONNX_FILE = "query_encoder.onnx"
BASELINE_DIR = "baseline-click"  # the single-task click model trained beside a version, for the eval


def save(model: RankerModel, tokenizer: Any, out_dir: Path, extra_config: Mapping[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"ranker": model.cfg.to_json(), "features": list(FEATURES), **(extra_config or {})}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    model.text.bert.config.save_pretrained(out_dir / "text")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))


def save_catalog(out_dir: Path, items: Sequence[Mapping[str, Any]], vectors: np.ndarray) -> None:
    """The catalog's product encodings (keyed by id and text hash), and what ``Catalog`` keeps."""
    np.save(out_dir / ITEM_ENCODINGS_FILE, np.asarray(vectors, dtype=np.float32))
    index = {"item_ids": [item_id_of(it) for it in items], "text_hashes": [text_hash(product_text(it)) for it in items]}
    (out_dir / ITEM_INDEX_FILE).write_text(json.dumps(index))
    catalog = Catalog.from_items(items)
    (out_dir / CATALOG_FILE).write_text(json.dumps(
        {"price_quantiles": catalog.to_json(), "items": {i: list(v) for i, v in catalog.items.items()}}))


class _QueryEncoder(nn.Module):
    def __init__(self, model: RankerModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(TextInput(input_ids, attention_mask))


def export_query_encoder(model_dir: Path) -> Path:
    """Write the query side (tokens -> encoding) as ONNX into the artifact, from the saved weights
    (a fresh copy: ``torch.onnx.export`` can leave the module it traced changed)."""
    import warnings

    model_dir = Path(model_dir)
    ranker = load(model_dir)
    example = ranker.tokenize(["wireless earbuds under $50", "sofa"])  # padding in the example: no branch traced away
    path = model_dir / QUERY_ONNX_FILE
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent branches in transformers
        torch.onnx.export(_QueryEncoder(ranker.model), (example.input_ids, example.attention_mask), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["vectors"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "vectors": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


def load(model_dir: Path) -> Ranker:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, "text", "tokenizer") if not (model_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: not a ranker artifact (missing {', '.join(missing)})")
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
        ranker.catalog = Catalog(saved["price_quantiles"])
        ranker.catalog.items = {i: (float(p), str(b), str(c)) for i, (p, b, c) in saved["items"].items()}
    return ranker


def build(cfg: RankerConfig) -> tuple[RankerModel, Any]:
    """A fresh model initialised from all-MiniLM-L6-v2 (offline, truncated) and its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    return RankerModel(cfg, truncated_bert(cfg.layers)), tokenizer


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
