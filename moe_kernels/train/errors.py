"""What ``moe-train`` reports in one line, without a traceback, exiting 2: an argument or a data
source the user gave that cannot be used as given. Each is also the built-in error it refines
(ValueError, FileNotFoundError), for callers of the library functions that raise it."""


class UsageError(Exception):
    """Something the user asked for cannot be done as asked."""


class BadArgument(UsageError, ValueError):
    """A setting out of its range or choices; the message names it."""


class MissingData(UsageError, FileNotFoundError):
    """A data source that does not exist here."""


class BadData(UsageError, ValueError):
    """A data source that exists but cannot be read as one."""
