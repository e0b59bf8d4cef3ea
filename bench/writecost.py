"""What a leader's write costs once followers are attached: a follower that caches makes
the leader publish every write into the change ring (docs/ARCHITECTURE.md), and a busy
one takes CPU from the leader on a small machine.

One process leads four databases and puts into them in short interleaved blocks (the
machine's speed drifts: every case sees the same load), beside raw plyvel:

    plyvel          raw plyvel, the floor
    alone           partydbm, no follower has ever attached (no ring)
    idle follower   one follower attached, with its cache, doing nothing
    busy follower   one follower attached reading random keys from its cache in a loop
                    (on 2 CPUs it competes with the leader for the machine)

Each put is `db[key] = value` with a fresh 16-byte key and a 100-byte value. Run
`python bench/writecost.py [--seconds S]`; prints µs per put and ratios to "alone".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import partydbm
from partydbm._backend import plyvel  # the binding partydbm took

BLOCK = 2000  # puts per block
VALUE = b"v" * 100
FOLLOWER = """
import random, sys, partydbm
db = partydbm.open(sys.argv[1], "c")
assert not db.is_leader
keys = [b"%016d" % i for i in range(1000)]
for k in keys:
    db.get(k)
print("ready", flush=True)
busy = sys.argv[2] == "busy"
if busy:
    import select
    while not select.select([sys.stdin], [], [], 0)[0]:
        for _ in range(1000):
            db.get(random.choice(keys))
sys.stdin.readline()
db.close()
"""


def _follower(path: str, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", FOLLOWER, path, mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the {mode} follower did not start")
    return proc


def _block(put: Callable[[bytes, bytes], Any], start: int) -> float:
    """Seconds per put over one block of fresh keys."""
    t0 = time.perf_counter()
    for i in range(start, start + BLOCK):
        put(b"%016d" % i, VALUE)
    return (time.perf_counter() - t0) / BLOCK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to measure")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="writecost-") as tmp:
        raw = plyvel.DB(os.path.join(tmp, "plyvel"), create_if_missing=True)
        dbs = {name: partydbm.open(os.path.join(tmp, name.replace(" ", "-")), "c")
               for name in ("alone", "idle follower", "busy follower")}
        procs = [_follower(os.path.join(tmp, "idle-follower"), "idle"),
                 _follower(os.path.join(tmp, "busy-follower"), "busy")]
        puts: dict[str, Callable[[bytes, bytes], Any]] = {"plyvel": raw.put}
        puts.update((name, db.__setitem__) for name, db in dbs.items())
        times: dict[str, list[float]] = {name: [] for name in puts}
        try:
            end, start = time.monotonic() + args.seconds, 0
            while time.monotonic() < end:
                for name, put in puts.items():
                    times[name].append(_block(put, start))
                start += BLOCK
        finally:
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("\n")
                proc.stdin.flush()
            for proc in procs:
                proc.wait(30)
            for db in dbs.values():
                db.close()
            raw.close()
    alone = statistics.median(times["alone"])
    print(f"µs per put, median of {len(times['alone'])} interleaved blocks of {BLOCK}:")
    for name, blocks in times.items():
        median = statistics.median(blocks)
        print(f"  {name:15} {median * 1e6:7.2f}   {median / alone:5.2f}x alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
