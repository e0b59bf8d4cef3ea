"""`python -m tests.workers [--without MODULE] NAME ARGS...`: run one worker (see
__init__.py). MODULE cannot be imported in it: of two LevelDB bindings installed,
partydbm then takes the other."""

from __future__ import annotations

import faulthandler
import importlib
import os
import sys

if sys.argv[1:2] == ["--without"]:  # before partydbm chooses its binding
    sys.modules[sys.argv[2]] = None  # type: ignore[assignment]  # import raises
    del sys.argv[1:3]

from partydbm import _seams

from . import apply_settings

_seams.load(os.environ)  # first thing: a test's env={"PARTYDBM_...": ...} for this worker
apply_settings(os.environ)
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
