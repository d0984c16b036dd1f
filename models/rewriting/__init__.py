"""Long-tail query rewriting (method 1 of the design): the home of the rewriter's training
(supervised fine-tuning, offline feedback, objective alignment) and of the rewrites it
produces ahead of time for the query handler's lookup. Not built yet."""
