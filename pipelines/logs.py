"""What cae2 says while it works: one logger tree with levels, lines on stderr, and progress that is a bar
on a terminal and a status line every few seconds in a log file (SLURM, Kubernetes, `> log 2>&1`).

    logger = logging.getLogger(__name__)      in every module (stdlib logging, nothing to import from here)
    logger.info("...")                        a line on stderr, on the main process only
    logger.warning("...")                     "WARNING: ..." on every process ("[rank N] WARNING: ..." off rank 0)

The level is INFO; `cae2 --quiet` (WARNING), `cae2 --verbose` (DEBUG) or CAE2_LOG_LEVEL set it. What a
command prints as its result (a summary, a table) goes to stdout, not through the log.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

from cae2.errors import UserError

LEVEL_VARIABLE = "CAE2_LOG_LEVEL"
PROGRESS_VARIABLE = "CAE2_PROGRESS_SECONDS"
PACKAGES = ("cae2", "targets", "pipelines", "bench")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def rank() -> int:
    """This process's global rank as its launcher (torchrun, accelerate launch, SLURM via them) set it."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (redirected, captured), not when it was made."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Lines(logging.Formatter):
    """INFO as it is; other levels named ("WARNING: ..."); off rank 0, the rank first."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno != logging.INFO:
            text = f"{record.levelname}: {text}"
        r = rank()
        return f"[rank {r}] {text}" if r else text


class _MainProcessOnly(logging.Filter):
    """Below WARNING, only rank 0 speaks (every rank would say the same)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or rank() == 0


_handler = _Stderr()
_handler.setFormatter(_Lines())
_handler.addFilter(_MainProcessOnly())


def level_from_environment() -> int:
    name = os.environ.get(LEVEL_VARIABLE, "INFO").strip().upper() or "INFO"
    if name not in LEVELS:
        raise UserError(f"{LEVEL_VARIABLE}={name!r} is not a log level; set one of {', '.join(LEVELS)} (or unset it)")
    return getattr(logging, name)


def setup(level: int | None = None) -> None:
    """Send the project's loggers to stderr at `level` (default: CAE2_LOG_LEVEL, else INFO). Idempotent."""
    root = logging.getLogger()
    if not root.handlers:  # else a library's logging.info() runs basicConfig, and every line shows twice
        root.addHandler(logging.NullHandler())
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if _handler not in logger.handlers:
            logger.addHandler(_handler)
        logger.setLevel(level_from_environment() if level is None else level)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A long loop's progress on the main process: a tqdm bar when stderr is a terminal; otherwise one status
    line every `every` seconds (CAE2_PROGRESS_SECONDS, default 30) with the count, the rate and an ETA, and
    one at the end. `note` adds the latest figures (loss, throughput) to either."""

    def __init__(self, total: int, *, initial: int = 0, unit: str = "step", enabled: bool = True,
                 name: str = "progress", every: float | None = None):
        self.total, self.done, self.unit, self.name = total, initial, unit, name
        self.enabled = enabled and rank() == 0
        self.every = float(os.environ.get(PROGRESS_VARIABLE, "30")) if every is None else every
        self.note = ""
        self._start_count, self._t0 = initial, time.monotonic()
        self._last = self._t0
        terminal = self.enabled and sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, file=sys.stderr) \
            if terminal else None
        self._logger = logging.getLogger("pipelines.progress")

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
            if self._bar is not None:
                self._bar.set_postfix_str(note, refresh=False)
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.every:
            self._say()

    def status(self) -> str:
        """'name: 120/1000 steps (12%), 3.2 steps/s, ETA 4m35s; note'."""
        elapsed = time.monotonic() - self._t0
        rate = (self.done - self._start_count) / elapsed if elapsed > 0 else 0.0
        left = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (f"{self.name}: {self.done}/{self.total} {self.unit}s{share}, {rate:.3g} {self.unit}s/s{left}"
                + (f"; {self.note}" if self.note else ""))

    def _say(self) -> None:
        self._last = time.monotonic()
        self._logger.info(self.status())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.done > self._start_count:
            self._say()
        self.enabled = False
