"""Torture: workers do seeded random writes, deletes, batches and scans against their
own dict models while the leader (whichever worker holds the LOCK) is SIGKILLed again
and again. Afterwards the database equals the models (the one write in flight in a
killed worker is ambiguous), every scan was ordered and exact, and nothing hung.

Small in CI; longer on demand:
  PARTYDBM_TORTURE_OPS=5000 PARTYDBM_TORTURE_KILLS=30 PARTYDBM_TORTURE_SEED=7 pytest -m torture
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

import partydbm
from partydbm._election import LockFile

from .procs import Party, Worker

WORKERS = 3


def _spawn(party: Party, path: Path, wid: int, seed: int, nops: int, log: Path) -> Worker:
    return party.spawn("torture", path, wid, seed, nops, log)


def _replay(log: Path, killed: bool) -> tuple[dict[bytes, bytes], dict[bytes, set[bytes | None]]]:
    """The model a worker's log proves, and for a killed worker the keys whose last
    write is in doubt, with the values they may hold (None: absent)."""
    model: dict[bytes, bytes] = {}
    doubt: dict[bytes, set[bytes | None]] = {}
    intent = None
    for line in log.read_text().splitlines():
        if line.startswith("I "):
            intent = line[2:].split(" ")
        elif line == "A" and intent is not None:
            _apply(model, intent)
            intent = None
    if intent is not None:
        assert killed, f"{log.name}: unacknowledged write in a worker that was not killed"
        after = dict(model)
        _apply(after, intent)
        for key in set(model) | set(after):
            if model.get(key) != after.get(key):
                doubt[key] = {model.get(key), after.get(key)}
    return model, doubt


def _apply(model: dict[bytes, bytes], intent: list[str]) -> None:
    kind, args = intent[0], intent[1:]
    if kind == "put":
        model[bytes.fromhex(args[0])] = bytes.fromhex(args[1])
    elif kind == "del":
        model.pop(bytes.fromhex(args[0]), None)
    else:
        for op in args:
            k, _, v = op.partition("=")
            if v:
                model[bytes.fromhex(k)] = bytes.fromhex(v)
            else:
                model.pop(bytes.fromhex(k), None)


@pytest.mark.torture
@pytest.mark.multiprocess
@pytest.mark.heavy
def test_torture_random_ops_with_repeated_leader_kills(tmp_path: Path) -> None:
    seed = int(os.environ.get("PARTYDBM_TORTURE_SEED") or random.randrange(1 << 30))
    nops = int(os.environ.get("PARTYDBM_TORTURE_OPS") or 5000)
    kills_wanted = int(os.environ.get("PARTYDBM_TORTURE_KILLS") or 4)
    print(f"torture seed={seed} ops/worker={nops} kills={kills_wanted}")
    rng = random.Random(seed)
    path = tmp_path / "db"
    partydbm.open(path, "c").close()
    lock = LockFile(str(path))  # only to ask who holds the LOCK; never locks
    workers: dict[int, Worker] = {}
    killed: set[int] = set()
    next_wid = 0
    deadline = time.monotonic() + 90 + nops * 0.05
    try:
        with Party() as party:
            for _ in range(WORKERS):
                workers[next_wid] = _spawn(party, path, next_wid, seed, nops,
                                           tmp_path / f"{next_wid}.log")
                next_wid += 1
            while len(killed) < kills_wanted and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.02, 0.12))  # a random moment, not a wait
                holder = lock.holder_pid()
                victim = next((wid for wid, w in workers.items()
                               if w.pid == holder and w.proc.poll() is None), None)
                if victim is None:
                    if all(w.proc.poll() is not None for w in workers.values()):
                        break
                    continue
                workers[victim].kill()  # SIGKILL, reaped
                killed.add(victim)
                workers[next_wid] = _spawn(party, path, next_wid, seed, nops,
                                           tmp_path / f"{next_wid}.log")
                next_wid += 1
            for wid, w in workers.items():
                code = w.wait(max(deadline - time.monotonic(), 1))  # WorkerError if hung
                if wid not in killed:
                    assert code == 0, f"worker {wid} (seed {seed}): {w.stderr()}"
    finally:
        os.close(lock.fd)
    print(f"torture seed={seed}: {next_wid} workers, {len(killed)} leaders killed")
    assert len(killed) >= min(kills_wanted, 1), f"no leader was killed (seed {seed})"
    with partydbm.open(path, "r") as db:
        for wid in range(next_wid):
            model, doubt = _replay(tmp_path / f"{wid}.log", wid in killed)
            prefix = b"w%d/" % wid
            stored = dict(db.iterator(prefix=prefix))
            for key in set(stored) | set(model):
                if key in doubt:
                    assert stored.get(key) in doubt[key], (seed, wid, key)
                else:
                    assert stored.get(key) == model.get(key), (seed, wid, key)
