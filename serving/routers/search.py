"""POST /search: personalised hybrid search (the pipeline is ``serving.search``)."""

from __future__ import annotations

from fastapi import APIRouter

from tailbridge.serving.dependencies import ComponentsDep
from tailbridge.serving.schemas import SearchRequest, SearchResponse
from tailbridge.serving.index import SearchUnavailable

router = APIRouter()


@router.post("/search", response_model=SearchResponse, responses={503: {"description": "The item index is unreachable."}})
async def search(body: SearchRequest, deps: ComponentsDep) -> SearchResponse:
    try:
        return await deps.service.search(body)
    except SearchUnavailable:
        deps.metrics.errors.labels("index_unavailable").inc()
        raise  # the app's exception handler answers 503 with the reason
