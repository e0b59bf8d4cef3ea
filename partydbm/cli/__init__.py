"""The tools around the library: the `partydbm` command line and what only it uses.

Nothing in the core imports this package. `_cli` parses the command line and runs a
subcommand; `_formats` shows and reads bytes; `_transfer` dumps, loads, imports and
exports; `_serve` is `partydbm serve`; `_demo` and `_demo_children` are `partydbm demo`;
`_errors` holds the failures the command line reports as one line.
"""

from __future__ import annotations

from ._cli import main

__all__ = ["main"]
