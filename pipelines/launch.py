"""`cae2 launch [accelerate options] COMMAND [options]`: `accelerate launch -m pipelines.cli COMMAND ...` in
one command, whose failure is one line and exit status 2 (each process has printed its own error line
above) instead of the launcher's traceback."""

from __future__ import annotations

import logging
import signal
import subprocess

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from cae2.errors import UserError


def launch(args: list[str], commands: list[str]) -> None:
    """Run the first of `commands` found in `args` under `accelerate launch`, with the options before it
    as accelerate's; a failed process raises UserError."""
    at = next((i for i, a in enumerate(args) if a in commands), None)
    if at is None:
        raise UserError(f"cae2 launch: name the command to launch ({', '.join(commands)}) after accelerate's options, "
                        "e.g. cae2 launch --multi_gpu --num_processes 8 pretrain --shards ...")
    parser = launch_command_parser()
    try:
        options = parser.parse_args([*args[:at], "-m", "pipelines.cli", *args[at:]])
    except SystemExit as e:  # argparse has printed what is wrong with accelerate's options
        raise UserError("cae2 launch: accelerate's options above do not parse; see `accelerate launch --help`") from e
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its own report of the failure
    try:
        launch_command(options)
    except ChildFailedError as e:
        _failed({rank: (f.exitcode, f.signal_name()) for rank, f in e.failures.items()})
    except subprocess.CalledProcessError as e:
        _failed({0: (e.returncode, "")})


def _failed(failures: dict[int, tuple[int, str]]) -> None:
    """One line of what became of each failed process: its own error line above says why, except where a
    signal killed it (nothing could be said: the OOM killer, a scheduler, kill -9)."""
    said = []
    for rank, (code, name) in sorted(failures.items()):
        if code in (-signal.SIGTERM, 128 + signal.SIGTERM):
            said.append(f"rank {rank} was stopped by SIGTERM (the launcher stops every rank once one has failed)")
        elif code < 0:
            said.append(f"rank {rank} was killed by {name or f'signal {-code}'} from outside and could say nothing "
                        "(the OOM killer, the scheduler, kill -9)")
        else:
            said.append(f"rank {rank} exited with status {code} (its error line above says why)")
    raise UserError(f"launch failed: {'; '.join(said)}")
