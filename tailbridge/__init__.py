"""tailbridge: a streaming, real-time feature and retrieval system for e-commerce search."""

import typeguard

# Feast wraps its classes in typeguard's @typechecked, which re-parses and recompiles their source
# at every import: seconds of CPU in each process that loads Feast (the worker, the app, most CLI
# commands; `import feast` 5.1 s -> 2.5 s of user CPU on this 2-core machine). The checks only
# re-check Feast's own annotations, so the instrumentation is skipped. Every module of the
# project is under this package, so this runs before any of them imports Feast.
typeguard.typechecked = lambda target=None, **_: target if target is not None else (lambda t: t)
