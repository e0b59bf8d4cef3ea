"""`python -m partydbm._helper PATH`: lead a database for a process that cannot.

A process forked while its parent held the database open inherits LevelDB's in-process
lock table and can never open it (docs/TRAPS.md, trap 2). When such a process needs a leader,
it starts this helper: a fresh interpreter that opens the database like any other
process (leading if it wins the LOCK) and keeps it open until its standard input
closes, i.e. until the process that started it is gone.
"""

from __future__ import annotations

import sys

from ._open import open_to_serve


def main(argv: list[str]) -> int:
    db = open_to_serve(argv[0], "w", timeout=None)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
