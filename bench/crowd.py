"""Crowds: how many of N forked processes get through, and how long it takes.

    python bench/crowd.py [--sizes 64,150,300] [--failover 300] [--json]

Runs the tests' crowd worker (tests/workers/crowd.py, see there) for: N processes
opening one database at the same instant while a Holder leads, for each size; the
largest size racing to create a new database; a crowd of followers whose leader is
SIGKILLed; and a crowd forked from the leader, which is SIGKILLed (they can only lead
through a helper). Prints, per storm, the processes that succeeded and the errors of
those that did not, the open times (median and slowest) or, for the failover, the time
from the kill until the last follower finished its writes and the longest single write
a follower saw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the crowd worker runs there: -m tests.workers
DEADLINE = 300.0


def storm(*args: Any) -> dict[str, Any]:
    """One storm in a fresh directory; its report. The worker runs in a session of its
    own, so a storm past its deadline is SIGKILLed with every process it started."""
    with tempfile.TemporaryDirectory(prefix="partydbm-crowd-") as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "tests.workers", "crowd", args[0],
                                 str(Path(tmp) / "db"), *map(str, args[1:])],
                                stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True,
                                text=True)
        try:
            out, _ = proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"errors": {f"no report within {DEADLINE}s": 1}}
        if proc.returncode != 0:
            return {"errors": {f"the crowd worker exited with {proc.returncode}": 1}}
        report: dict[str, Any] = json.loads(out)
        return report


def line(name: str, r: dict[str, Any]) -> str:
    ok = f"{r.get('ok', 0)}/{r.get('n', '?')} ok"
    if "open_s" in r:
        timing = (f"open median {r['open_s'].get('median', 0) * 1e3:.0f} ms, "
                  f"slowest {r['open_s'].get('max', 0) * 1e3:.0f} ms")
    else:
        done = r.get("all_done_after_kill_s")
        timing = (f"all done {done * 1e3:.0f} ms after the kill, longest write "
                  f"{r.get('max_write_s', {}).get('max', 0) * 1e3:.0f} ms"
                  if done is not None else "")
    lost = f", {r['lost_count']} acknowledged writes lost" if r.get("lost_count") else ""
    errors = "".join(f"\n    {count} x {text}" for text, count in r.get("errors", {}).items())
    return f"{name:<34} {ok:>10}  {timing}{lost}{errors}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64,150,300", help="crowds that open at once")
    ap.add_argument("--failover", type=int, default=300, help="followers of a killed leader")
    ap.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: list[tuple[str, tuple[str | int, ...]]] = [
        (f"open {n} at once, another leads", ("open", n, "--lead")) for n in sizes]
    runs.append((f"open {max(sizes)} at once, none leads", ("open", max(sizes))))
    runs.append((f"failover of {args.failover} followers", ("failover", args.failover)))
    runs.append((f"failover of {args.failover} forked from it", ("prefork", args.failover)))
    reports = {}
    for name, argv in runs:
        reports[name] = storm(*argv)
        if not args.json:
            print(line(name, reports[name]), flush=True)
    if args.json:
        print(json.dumps(reports, indent=1))
    return 0 if all(r.get("ok") == r.get("n") for r in reports.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
