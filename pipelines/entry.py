"""The `cae2` console script: Ctrl-C while the command line is still loading (torch and friends take seconds)
is one line and status 130, like Ctrl-C at any later moment."""

import sys


def main() -> None:
    try:
        from pipelines.cli import main as run_cli  # deferred: Ctrl-C during its seconds is caught
    except KeyboardInterrupt:
        print("interrupted while starting: nothing was done", file=sys.stderr, flush=True)
        sys.exit(130)
    run_cli()
