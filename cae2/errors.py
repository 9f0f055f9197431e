"""The one exception type for problems with a user's input (files, options, stores)."""


class UserError(Exception):
    """Bad input. The message is one line that names the file, key or option and says how to fix it;
    the CLI prints it without a traceback (unless --debug) and exits with status 2."""
