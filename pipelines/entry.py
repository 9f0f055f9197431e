"""The `cae2` console script: Ctrl-C while the command line is still loading (torch and friends take seconds)
is one line and status 130, like Ctrl-C at any later moment."""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    # Exit at once: nothing has been done yet, and an exception raised inside a library's import can leave
    # it half-initialised and surface as another error.
    print("interrupted while starting: nothing was done", file=sys.stderr, flush=True)
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from pipelines.cli import main as run_cli  # deferred: Ctrl-C during its seconds is caught

    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_cli()
