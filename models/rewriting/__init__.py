"""Long-tail query rewriting (method 1 of the design): the generator (`generator.py`), its
three training stages (multi-instruction SFT in `sft.py` on pairs from `mining.py`, offline
feedback in `feedback.py`, objective alignment in `align.py`, again on the online partial order
in `online.py`), the rule that keeps only rewrites on the query's intent (`intent.py`),
evaluation (`evaluate.py`) and versions (`versions.py`). The rewrites themselves are written
to the store by `tailbridge rewriter fill` and by the stream worker's rewrite processor."""
