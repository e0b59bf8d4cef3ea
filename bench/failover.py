"""Failover stall: time from SIGKILL of the leader to the completion of a follower's
request that was blocked on it.

    python bench/failover.py [--rounds N]

Each round: a Holder process leads, a second Holder follows, and this process follows
with a request in flight to the leader, which is SIGSTOPped so that the request is
surely blocked; then the leader is SIGKILLed. The stall is measured from the kill to
the request's completion, whichever process takes over (this one or the other
follower). `measure(rounds)` is importable (bench.py calls it).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# The repository root: the source tree's partydbm, and tests.procs (the test suite's
# process driver, whose Holder leads and follows here as it does in the tests).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import partydbm
from tests.procs import Holder


def one_round(root: Path, i: int) -> tuple[float, bool]:
    path = root / f"db{i}"
    leader, other = Holder(), Holder()
    try:
        assert leader.open(path) == "leader"
        assert other.open(path) == "follower"
        with partydbm.open(path) as db:
            db[b"k"] = b"v"
            os.kill(leader.pid, signal.SIGSTOP)
            done = threading.Event()
            result: list[bytes] = []

            def blocked_get() -> None:
                result.append(db[b"k"])
                done.set()

            t = threading.Thread(target=blocked_get)
            t.start()
            time.sleep(0.02)  # the request is now on the leader's socket
            t0 = time.perf_counter()
            os.kill(leader.pid, signal.SIGKILL)
            if not done.wait(10):
                raise RuntimeError("follower request did not complete after failover")
            stall = time.perf_counter() - t0
            t.join(10)
            assert result == [b"v"]
            return stall, db.is_leader
    finally:
        leader.kill()
        leader.close()
        other.close()


def measure(rounds: int = 20) -> dict[str, float]:
    stalls = []
    self_led = 0
    with tempfile.TemporaryDirectory(prefix="partydbm-failover-") as tmp:
        for i in range(rounds):
            stall, led = one_round(Path(tmp), i)
            stalls.append(stall)
            self_led += led
    return {
        "rounds": rounds,
        "median_ms": statistics.median(stalls) * 1e3,
        "max_ms": max(stalls) * 1e3,
        "min_ms": min(stalls) * 1e3,
        "took_over_here": self_led,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    r = measure(ap.parse_args().rounds)
    print(f"failover stall over {r['rounds']} rounds: median {r['median_ms']:.1f} ms, "
          f"min {r['min_ms']:.1f} ms, max {r['max_ms']:.1f} ms "
          f"(this process took over in {r['took_over_here']} rounds, the other follower in "
          f"{r['rounds'] - r['took_over_here']}); target median <= 20 ms")


if __name__ == "__main__":
    main()
