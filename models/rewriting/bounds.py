"""What may go into the generator and what may come out of it (pure logic, no model).

Queries reach the rewriter from the log, the data and the live stream, so anything can arrive:
empty text, megabytes, control characters, scripts the model never saw. ``clean_query`` makes
any string safe to prompt with (or says there is nothing to rewrite); ``accept_rewrite`` turns a
decoded generation into a rewrite that is never empty, never the query again (under the key
search looks rewrites up by) and never longer than ``MAX_REWRITE_WORDS`` / ``MAX_REWRITE_CHARS``.
"""

from __future__ import annotations

import re
import unicodedata

from tailbridge.vocab import normalize_query

MAX_QUERY_CHARS = 200  # longer queries are cut (at a word boundary) before prompting
MAX_REWRITE_WORDS = 12
MAX_REWRITE_CHARS = 96
REPLACEMENT = "\ufffd"
_SPACES = re.compile(r"\s+")


def _printable(text: str) -> str:
    """Control, format and unassigned characters become spaces; everything else stays."""
    return "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` characters, ending at a word boundary when there is one."""
    if len(text) <= limit:
        return text
    head = text[:limit + 1]
    space = head.rfind(" ")
    return (head[:space] if space > 0 else text[:limit]).strip()


def clean_query(text: object) -> str:
    """The text to prompt with: printable, single-spaced, at most ``MAX_QUERY_CHARS``; "" when
    nothing is left (or the input is not a string): such a query gets no rewrite."""
    if not isinstance(text, str):
        return ""
    return _cut(_SPACES.sub(" ", _printable(unicodedata.normalize("NFKC", text))).strip(), MAX_QUERY_CHARS)


def accept_rewrite(query: str, generated: str) -> str | None:
    """A decoded generation as a rewrite of ``query``, or None when it cannot be one: the first
    line only, cleaned, at most ``MAX_REWRITE_WORDS`` words and ``MAX_REWRITE_CHARS``
    characters, with a letter or digit in it (a decoding's replacement characters removed), and
    not the query itself once normalised."""
    first = generated.strip().split("\n", 1)[0] if isinstance(generated, str) else ""
    # U+FFFD is what decoding leaves of a multi-byte character cut between byte-level tokens.
    text = clean_query(first.replace(REPLACEMENT, " "))
    text = " ".join(text.split(" ")[:MAX_REWRITE_WORDS])
    text = _cut(text, MAX_REWRITE_CHARS).strip(" .,;:-")
    if not any(ch.isalnum() for ch in text) or normalize_query(text) == normalize_query(clean_query(query)):
        return None  # nothing a search could match (empty, punctuation or symbols only), or the query again
    return text


def distinct_rewrites(query: str, generated: list[str], limit: int) -> list[str]:
    """The accepted generations, best first, without two that normalise to the same key."""
    out: dict[str, str] = {}
    for text in generated:
        accepted = accept_rewrite(query, text)
        if accepted is not None:
            out.setdefault(normalize_query(accepted), accepted)
        if len(out) == limit:
            break
    return list(out.values())
