"""partydbm: a dbm database that many processes can open at once.

LevelDB (plyvel) storage; the first process to take LevelDB's LOCK leads and serves the
others over a unix socket (msgpack). See docs/CONTRACT.md for the public contract.
"""

from ._errors import (
    BadFlagError,
    ClosedError,
    LeaderLostError,
    ProtocolError,
    ReadOnlyError,
    Timeout,
    error,
)
from ._mapping import PartyDBM, WriteBatch
from ._open import install, let_go, open, open_flags, repair, uninstall, whichdb

__version__ = "0.1.0"

__all__ = [
    "BadFlagError",
    "ClosedError",
    "LeaderLostError",
    "PartyDBM",
    "ProtocolError",
    "ReadOnlyError",
    "Timeout",
    "WriteBatch",
    "__version__",
    "error",
    "install",
    "let_go",
    "open",
    "open_flags",
    "repair",
    "uninstall",
    "whichdb",
]
