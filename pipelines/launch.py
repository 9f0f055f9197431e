"""`cae2 launch [accelerate options] COMMAND [options]`: `accelerate launch -m pipelines.cli COMMAND ...` in
one command, whose failure is one line and exit status 2 (each process has printed its own error line
above) instead of the launcher's traceback."""

from __future__ import annotations

import logging
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
        _failed(len(e.failures), sorted({f.exitcode for f in e.failures.values()}))
    except subprocess.CalledProcessError as e:
        _failed(1, [e.returncode])


def _failed(processes: int, codes: list[int]) -> None:
    raise UserError(f"{processes} launched process(es) failed (exit status {', '.join(map(str, codes))}); the line "
                    "each printed above says why")
