"""GET /: the search page, one static file (plain HTML, CSS and JS) that talks to this app."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

PAGE = Path(__file__).parent.parent / "static" / "index.html"

router = APIRouter()


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(PAGE)
