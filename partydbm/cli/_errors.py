"""The command line's own failures, apart from the library's (partydbm.error).

`main()` turns each into one line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations


class CliError(Exception):
    """A failure to report as one line on stderr (exit code 1)."""


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2)."""
