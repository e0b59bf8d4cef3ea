"""`python -m partydbm`: the command line (see partydbm/_cli.py, or `--help`)."""

from __future__ import annotations

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
