"""The exception tree, and the table that carries errors across the socket as codes.

Imports nothing of ours. Every error the package raises derives from `error`, an
`OSError`, so `except dbm.error` and `except OSError` both catch it. All classes keep
OSError's constructor, so they pickle.
"""

from __future__ import annotations

from typing import Any

CLOSED_MESSAGE = "DBM object has already been closed"
READONLY_MESSAGE = "The database is opened for reading only"


class error(OSError):  # the dbm modules' name for it
    """Base of every partydbm error."""


class ClosedError(error):
    """The handle (or the iterator's handle) has been closed."""


class ReadOnlyError(error):
    """A write was attempted on a handle opened with flag 'r'."""


class LeaderLostError(error, ConnectionError):
    """The leader went away with this request in flight (retry=False)."""


class ProtocolError(error):
    """A peer sent something partydbm cannot understand."""


class Timeout(error, TimeoutError):  # the name docs/CONTRACT.md promises
    """No leader answered within the handle's timeout."""


class BadFlagError(error, ValueError):
    """The flag passed to open() is not one partydbm knows."""


# Wire codes: errors cross the socket as [code, message] or, for an error that has an
# errno (a full disk: ENOSPC), [code, message, errno, filename]; never pickles.
_CODES: dict[str, type[BaseException]] = {
    "error": error,
    "closed": ClosedError,
    "readonly": ReadOnlyError,
    "protocol": ProtocolError,
    "timeout": Timeout,
    "leaderlost": LeaderLostError,
    "type": TypeError,
    "value": ValueError,
    "key": KeyError,
}
_NAMES = {cls: code for code, cls in _CODES.items()}


def to_wire(exc: BaseException) -> list[Any]:
    """What stands for `exc` on the wire: [code, message], or [code, message, errno,
    filename] when it is an OSError with an errno (rebuilt the same on the other side:
    same class, same errno, same text)."""
    for cls in type(exc).__mro__:
        code = _NAMES.get(cls)
        if code is not None:
            break
    else:
        return ["error", f"{type(exc).__name__}: {exc}"]
    if isinstance(exc, OSError) and type(exc.errno) is int:
        filename = exc.filename if isinstance(exc.filename, str) else None
        return [code, str(exc.strerror), exc.errno, filename]
    return [code, str(exc)]


def from_wire(payload: object) -> BaseException:
    """Rebuild the exception a peer described; malformed descriptions are protocol errors."""
    if (
        isinstance(payload, (list, tuple))
        and len(payload) in (2, 4)
        and isinstance(payload[0], str)
        and isinstance(payload[1], str)
    ):
        cls = _CODES.get(payload[0], error)
        if len(payload) == 2:
            return cls(payload[1])
        errno, filename = payload[2], payload[3]
        if type(errno) is int and issubclass(cls, OSError) and (
                filename is None or isinstance(filename, str)):
            if filename is None:
                return cls(errno, payload[1])
            return cls(errno, payload[1], filename)
    return ProtocolError(f"malformed error reply from the leader: {payload!r}"[:300])
