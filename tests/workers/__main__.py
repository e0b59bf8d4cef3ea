"""`python -m tests.workers NAME ARGS...`: run one worker (see __init__.py)."""

from __future__ import annotations

import faulthandler
import importlib
import os
import sys

from partydbm import _seams

_seams.load(os.environ)  # first thing: a test's env={"PARTYDBM_...": ...} for this worker
faulthandler.enable()  # a crash (SIGSEGV in LevelDB, say) shows every thread's stack

# Worker name -> its module, imported alone: every worker process pays for its imports.
WORKERS = {
    "repl": "repl", "holder": "repl",
    "turnover": "oneshot", "forker": "oneshot", "plain_leveldb": "oneshot",
    "uid_probe": "oneshot",
    "fork_from_leader": "fork", "fork_outlive_close": "fork", "fork_outlive_exit": "fork",
    "fork_from_follower": "fork", "fork_leader_returns": "fork",
    "torture": "torture", "close_under_threads": "races", "stale_check": "stale",
    "crowd": "crowd",
}

name = sys.argv[1]
module = importlib.import_module(f"{__package__}.{WORKERS[name]}")
result = getattr(module, name)(*sys.argv[2:])
raise SystemExit(result if isinstance(result, int) else 0)
