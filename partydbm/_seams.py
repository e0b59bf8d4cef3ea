"""Test seams: switches that tests turn on in the processes they start.

The library never reads these from the environment by itself. A test's worker process
(tests/workers.py, the holder, the torture worker) calls `load(os.environ)` first
thing, so a test can still say `env={"PARTYDBM_NEVER_LEAD": "1"}` for a child; in
every other process the seams stay off. The core reads them at the moment they
matter (never copies them at import), so a test may also flip them in-process.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping

never_lead = False
"""This process never takes the LOCK (a pure follower)."""

resend_delay = 0.0
"""Seconds to wait before resending (or, on promotion, replaying) carried-over requests,
so that a test can issue other writes in between."""

crash_at: tuple[str, int] | None = None
"""(point, n): SIGKILL this process at the n-th passage through `point` (before_apply,
after_apply, mid_scan; after_write, mid_append: publishing a change to the ring;
promote: taking over, the old ring retired and nothing served yet)."""

pauses: dict[str, float] = {}
"""point -> seconds to sleep there ("rmw": between the read and the write of a
read-modify-write on the leader; "after_write": between a published write and the
publication of its outcome; to widen the window a race test needs)."""

listen_backlog: int | None = None
"""A leader's listen backlog instead of the largest the system allows: a small one that
a small crowd fills, so that its connects must wait for room."""

grace: tuple[float, float] | None = None
"""(leader, follower): seconds an idle engine lingers instead of _grace.LEADER and
_grace.FOLLOWER (a long one, to test what holds while an engine lingers; 0: none)."""

_passages: dict[str, int] = {}


def load(env: Mapping[str, str]) -> None:
    """Set the seams from PARTYDBM_NEVER_LEAD, PARTYDBM_RESEND_DELAY, PARTYDBM_CRASH_AT
    ("point[:n]"), PARTYDBM_PAUSE ("point:seconds[,point:seconds...]"),
    PARTYDBM_LISTEN_BACKLOG and PARTYDBM_GRACE ("leader,follower" seconds) in `env`."""
    global never_lead, resend_delay, crash_at, pauses, listen_backlog, grace
    never_lead = bool(env.get("PARTYDBM_NEVER_LEAD"))
    resend_delay = float(env.get("PARTYDBM_RESEND_DELAY") or 0)
    backlog = env.get("PARTYDBM_LISTEN_BACKLOG")
    listen_backlog = int(backlog) if backlog else None
    spans = env.get("PARTYDBM_GRACE")
    if spans:
        lead, _, follow = spans.partition(",")
        grace = (float(lead), float(follow or lead))
    else:
        grace = None
    spec = env.get("PARTYDBM_CRASH_AT")
    if spec:
        point, _, n = spec.partition(":")
        crash_at = (point, int(n or 1))
    else:
        crash_at = None
    pauses = {}
    for item in filter(None, (env.get("PARTYDBM_PAUSE") or "").split(",")):
        point, _, seconds = item.partition(":")
        pauses[point] = float(seconds)


def passage(point: str) -> None:
    """Count a passage through `point`; SIGKILL the process if crash_at says so."""
    if crash_at is None or crash_at[0] != point:
        return
    n = _passages[point] = _passages.get(point, 0) + 1
    if n >= crash_at[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def pause(point: str) -> None:
    """Sleep as long as `pauses` says for `point` (not at all, normally)."""
    seconds = pauses.get(point) if pauses else None
    if seconds:
        time.sleep(seconds)
