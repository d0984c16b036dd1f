"""The instructions the rewriter is trained and asked with: one short prompt per task, the
same for every model (SmolLM2 and the tiny test models alike), so that a rewrite prompt at
serving time is byte for byte the one it was fine-tuned on.

Tasks (multi-instruction fine-tuning): ``rewrite`` (a long-tail query -> a query in the words
the catalog and frequent searches use), and the auxiliary ``category`` (query -> its category
path), ``keywords`` (query -> the title keywords of what it wants) and ``correct`` (a misspelt
query -> the query).
"""

from __future__ import annotations

INSTRUCTIONS = {
    "rewrite": "Rewrite the shopping query in the words product titles use.",
    "category": "Name the product category of the shopping query.",
    "keywords": "Give the product title keywords for the shopping query.",
    "correct": "Correct the spelling of the shopping query.",
}
TASKS = tuple(INSTRUCTIONS)


def prompt(task: str, query: str) -> str:
    """The text the model continues; its answer follows one space after "Answer:"."""
    return f"{INSTRUCTIONS[task]}\nQuery: {query}\nAnswer:"


def target(text: str) -> str:
    """The continuation a training example teaches (the tokenizer's end token is added after)."""
    return f" {text}"
