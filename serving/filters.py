"""Typed search filters -> a Milvus filter expression.

The expression's structure (field names, operators, ``and``) comes only from this module; a
client's value can only ever be the content of one string or number literal. Strings are
quoted by ``string_literal`` (backslash and quote escaped; control characters are refused
earlier by the request schema), numbers are validated finite floats. Milvus expression
templates (``filter_params``) would bind values instead, but Milvus Lite does not support
them, and one code path for every deployment is worth more than the difference.
"""

from __future__ import annotations

from tailbridge.serving.schemas import SearchFilters


def string_literal(value: str) -> str:
    """A double-quoted Milvus string literal whose parsed value is exactly ``value``."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def compile_filters(filters: SearchFilters) -> str:
    clauses: list[str] = []
    if filters.category is not None:
        clauses.append(f"category == {string_literal(filters.category)}")
    if filters.brand is not None:
        clauses.append(f"brand == {string_literal(filters.brand)}")
    if filters.price_min is not None:
        clauses.append(f"price >= {float(filters.price_min)!r}")
    if filters.price_max is not None:
        clauses.append(f"price <= {float(filters.price_max)!r}")
    return " and ".join(clauses)
