"""Run a faust app as this process's worker and end the process with its exit code."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def run_and_exit(app, loglevel: str) -> NoReturn:
    import faust

    code = 0
    try:
        faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else 1
    # Offsets are committed and the producer flushed: skip the interpreter's teardown, whose
    # garbage collection of models and clients takes seconds on a busy machine.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
