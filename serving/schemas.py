"""The HTTP contract of the query handler: typed requests and responses (FastAPI builds the
OpenAPI schema, and the 422 field errors, from these)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
# Filter values become Milvus string literals: control characters have no business there.
FilterText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256,
                                              pattern=r"^[^\x00-\x1f\x7f]*$")]


class SearchFilters(BaseModel):
    """Typed filters; the server compiles them into a Milvus expression (serving.filters), so a
    client value can only ever be compared, never become part of the expression."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    category: FilterText | None = Field(None, description="Leaf category, exact match (e.g. 'Running Shoes').")
    brand: FilterText | None = Field(None, description="Brand, exact match.")
    price_min: float | None = Field(None, ge=0, le=1e9, description="Lowest price, inclusive.")
    price_max: float | None = Field(None, ge=0, le=1e9, description="Highest price, inclusive.")

    @model_validator(mode="after")
    def _price_range(self) -> SearchFilters:
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError(f"price_min ({self.price_min}) is above price_max ({self.price_max})")
        return self


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=512)]
    user_id: Text | None = Field(None, description="The shopper; without one the search is not personalised.")
    session_id: Text | None = None
    k: int = Field(10, ge=1, le=100, description="How many results to return.")
    filters: SearchFilters = Field(default_factory=SearchFilters)
    explain: bool = Field(False, description="Add stage timings and each result's score parts.")


class ScoreParts(BaseModel):
    """Where a result's score came from (explain=true)."""

    dense_score: float | None = Field(None, description="Inner product of query and item vectors (best route).")
    dense_rank: int | None = None
    bm25_score: float | None = Field(None, description="BM25 score as Milvus returns it (best route).")
    bm25_rank: int | None = None
    fused: float = Field(description="Reciprocal-rank fusion over every route and rewrite.")
    routes: list[str] = Field(description="Every route that retrieved the item, e.g. dense, bm25, rewrite:<text>/dense.")
    click: float | None = Field(None, description="Ranker's click probability.")
    add_to_cart: float | None = None
    purchase: float | None = None
    ranker: float | None = Field(None, description="Weighted head probabilities, relative to this search's best.")
    retrieval_prior: float | None = Field(None, description="Reciprocal-rank prior of the fused order (1 = first).")


class ItemStats(BaseModel):
    """The item's behaviour over the last 24 h and its conversion per click over 7 days, from
    the Feast ``item_stats`` view: what the ranker used. The priors for an item nobody engaged
    with, and for every item when the read failed (``degraded`` then names ``item_stats``)."""

    ctr_24h: float = Field(description="Click-through rate, smoothed towards the prior.")
    cvr_24h: float = Field(description="Purchases per click, smoothed towards the prior.")
    purchases_24h: int
    cart_rate_7d: float = Field(description="Add-to-carts per click over 7 days, smoothed towards the prior.")
    cvr_7d: float = Field(description="Purchases per click over 7 days, smoothed towards the prior.")


class SearchHit(BaseModel):
    item_id: str
    position: int
    score: float = Field(description="With a ranker: ranker + retrieval_weight x retrieval_prior; without: the fused score.")
    title: str
    brand: str
    category: str
    price: float
    source: str = Field(description="Route that ranked the item best: dense, bm25 or rewrite:<text>.")
    stats: ItemStats
    parts: ScoreParts | None = None


class SearchResponse(BaseModel):
    query_id: str
    query: str
    user_id: str | None
    personalized: bool = Field(description="A user context was found and used.")
    results: list[SearchHit]
    rewrites: list[str]
    degraded: list[str] = Field(description="Dependencies that failed or timed out; the answer is made without them.")
    model_versions: dict[str, str]
    timings_ms: dict[str, float] | None = Field(None, description="Per stage (explain=true).")


class EventAccepted(BaseModel):
    event_id: str
    topic: str


class Readiness(BaseModel):
    ready: bool
    dependencies: dict[str, str] = Field(description="Dependency -> 'ok' or what is wrong with it.")


class UserList(BaseModel):
    user_ids: list[str] = Field(description="Shoppers whose user_context row is not empty now, sorted.")
    source: str = Field(description="Where the candidates came from, and how many were looked at.")
