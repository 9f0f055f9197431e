"""The one exception type for problems with a user's input (files, options, stores), and how OS errors
name their file."""

import contextlib


class UserError(Exception):
    """Bad input. The message is one line that names the file, key or option and says how to fix it;
    the CLI prints it without a traceback (unless --debug) and exits with status 2."""


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """SIGTERM, raised by the CLI in a command that does not save and stop on it itself (pretrain, finetune and
    the probe do): a loop that can say how far it got catches it as it catches KeyboardInterrupt."""


class Stopped(UserError):
    """A command stopped by a signal before it finished; the message says what is complete and how to go on.
    The CLI prints it as it is and exits with `status` (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def naming(path):
    """Give an OSError raised inside without a file name (a failed read or write of an open file) the
    name of the file or folder being worked on, so that its one-line report says where it happened."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
