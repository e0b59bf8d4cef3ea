"""`python -m tests.workers NAME ARGS...`: run one worker (see __init__.py)."""

from __future__ import annotations

import os
import sys

from partydbm import _seams

_seams.load(os.environ)  # first thing: a test's env={"PARTYDBM_...": ...} for this worker

from . import fork, oneshot, repl, torture  # noqa: E402 - after the seams, on purpose

WORKERS = {f.__name__: f for f in (
    repl.repl, repl.holder, oneshot.turnover, oneshot.forker, oneshot.plain_leveldb,
    oneshot.uid_probe,
    fork.fork_from_leader, fork.fork_outlive_close, fork.fork_outlive_exit,
    fork.fork_from_follower, fork.fork_leader_returns, torture.torture)}

result = WORKERS[sys.argv[1]](*sys.argv[2:])
raise SystemExit(result if isinstance(result, int) else 0)
