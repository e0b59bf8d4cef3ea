"""`python -m partydbm`: the command line (see partydbm/cli/, or `--help`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
