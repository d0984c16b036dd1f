"""The rewriter's training objectives, one module each: ``sft`` (stage 1, and the fluency term
of stage 3) and ``bradley_terry`` (stage 3, preferences over a partial order of rewrites)."""
