"""How the command line shows and reads bytes, and its progress line.

Every format is a bijection between bytes and a one-line string, so whatever `keys`
or `get` prints can be given back as an argument in the same format:

    text    UTF-8, with a backslash written `\\\\` and every byte of a non-printable
            character or of invalid UTF-8 written `\\xNN` (arguments also accept
            `\\n`, `\\r`, `\\t`, `\\0`)
    hex     bytes.hex()
    base64  standard base64
    json    a JSON string when the bytes are valid UTF-8, else {"base64": "..."}
            (the field encoding of `dump` files)
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from typing import Any, TextIO

FORMATS = ("text", "hex", "base64", "json")
_ARG_ESCAPES = {"\\": b"\\", "n": b"\n", "r": b"\r", "t": b"\t", "0": b"\0"}


class FormatError(ValueError):
    """An argument or a dump line that does not parse in the format given."""


def show(data: bytes, fmt: str) -> str:
    """`data` as one line in format `fmt`."""
    if fmt == "text":
        return _text_show(data)
    if fmt == "hex":
        return data.hex()
    if fmt == "base64":
        return base64.b64encode(data).decode("ascii")
    return json.dumps(to_json(data), ensure_ascii=False)


def parse(arg: str, fmt: str) -> bytes:
    """The bytes an argument given in format `fmt` stands for; FormatError if none."""
    try:
        if fmt == "text":
            return _text_parse(arg)
        if fmt == "hex":
            return bytes.fromhex(arg)
        if fmt == "base64":
            return base64.b64decode(arg, validate=True)
        return from_json(json.loads(arg))
    except FormatError:
        raise
    except (ValueError, binascii.Error) as exc:  # JSONDecodeError, UnicodeError included
        raise FormatError(f"not valid {fmt}: {arg!r} ({exc})") from None


def _text_show(data: bytes) -> str:
    s = data.decode("utf-8", "surrogateescape")
    if s.isprintable() and "\\" not in s:
        return s
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():  # a lone surrogate (an invalid byte) is not printable
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def _text_parse(arg: str) -> bytes:
    # Arguments reach us as str decoded with surrogateescape: encoding the same way
    # gives back the exact bytes of argv, UTF-8 or not.
    if "\\" not in arg:
        return arg.encode("utf-8", "surrogateescape")
    out = bytearray()
    i, n = 0, len(arg)
    while i < n:
        ch = arg[i]
        if ch != "\\":
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        nxt = arg[i + 1:i + 2]
        if nxt in _ARG_ESCAPES:
            out += _ARG_ESCAPES[nxt]
            i += 2
        elif nxt == "x" and _is_hex(arg[i + 2:i + 4]):
            out.append(int(arg[i + 2:i + 4], 16))
            i += 4
        else:
            raise FormatError(f"bad escape {arg[i:i + 2]} at position {i}: write \\\\ for "
                              "a backslash, \\xNN for a byte")
    return bytes(out)


def _is_hex(s: str) -> bool:
    return len(s) == 2 and all(c in "0123456789abcdefABCDEF" for c in s)


def to_json(data: bytes) -> Any:
    """A JSON value for `data`: the text itself when it is UTF-8, else {"base64": ...}.
    Valid UTF-8 never decodes to a lone surrogate, so the string form is plain JSON
    that every JSON reader takes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def from_json(obj: Any) -> bytes:
    """The inverse of to_json()."""
    if isinstance(obj, str):
        try:
            return obj.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError("a JSON string with a lone surrogate stands for no bytes; "
                              'use {"base64": "..."}') from None
    if isinstance(obj, dict) and set(obj) == {"base64"} and isinstance(obj["base64"], str):
        try:
            return base64.b64decode(obj["base64"], validate=True)
        except binascii.Error as exc:
            raise FormatError(f"bad base64: {exc}") from None
    raise FormatError(f'expected a JSON string or {{"base64": "..."}}, not {obj!r}')


def record(key: bytes, value: bytes) -> str:
    """One line of a dump file (also what `items --format json` prints)."""
    return json.dumps({"key": to_json(key), "value": to_json(value)}, ensure_ascii=False)


def parse_record(line: bytes) -> tuple[bytes, bytes]:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise FormatError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict) or "key" not in obj or "value" not in obj:
        raise FormatError('expected {"key": ..., "value": ...}')
    return from_json(obj["key"]), from_json(obj["value"])


class Progress:
    """A one-line progress display on stderr, only when stderr is a terminal (nothing
    at all when it is piped or redirected). Redrawn at most 10 times a second."""

    def __init__(self, label: str, total: int | None = None, *, unit: str = "items",
                 stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.label = label
        self.total = total
        self.unit = unit
        self.count = 0
        self.done_bytes = 0
        self.total_bytes: int | None = None
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        self.count += n
        self.done_bytes += nbytes
        if self.enabled:
            now = time.monotonic()
            if now - self._last >= 0.1:
                self._last = now
                self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        parts = [f"{self.label}: {self.count:,}"]
        if self.total is not None:
            parts[0] += f"/{self.total:,}"
            if self.total:
                parts.append(f"{min(self.count / self.total, 1.0):4.0%}")
        parts[0] += f" {self.unit}"
        if self.total_bytes:
            parts.append(f"{min(self.done_bytes / self.total_bytes, 1.0):4.0%} of "
                         f"{human_size(self.total_bytes)}")
        parts.append(f"{self.count / elapsed:,.0f} {self.unit}/s")
        parts.append(f"{elapsed:.1f}s")
        self.stream.write("\r" + "  ".join(parts) + "\x1b[K")
        self.stream.flush()


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
