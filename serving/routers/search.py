"""POST /search: personalised hybrid search (the pipeline is ``serving.search``)."""

from __future__ import annotations

from fastapi import APIRouter

from tailbridge.serving.dependencies import ComponentsDep
from tailbridge.serving.schemas import SearchRequest, SearchResponse
from tailbridge.serving.search import SearchUnavailable

router = APIRouter()


@router.post("/search", response_model=SearchResponse, responses={503: {"description": "The item index is unreachable."}})
def search(body: SearchRequest, deps: ComponentsDep) -> SearchResponse:
    try:
        return deps.service.search(body)
    except SearchUnavailable:
        deps.metrics.errors.labels("index_unavailable").inc()
        raise  # the app's exception handler answers 503 with the reason
