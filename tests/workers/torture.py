"""One torture worker: seeded random ops on its own key prefix, checked against a dict.

Usage: python -m tests.workers torture PATH WID SEED NOPS LOG

The worker logs every write's intent before issuing it and its acknowledgement after,
so that the parent can rebuild the model even if this process is SIGKILLed (the one
write in flight then is ambiguous). Its own iterations must equal its model exactly,
since no other process writes its prefix. Exit 1 with a message on any mismatch.
"""

from __future__ import annotations

import os
import random
import sys

import partydbm


def torture(path: str, wid_arg: str, seed_arg: str, nops_arg: str, log: str) -> int:
    wid, seed, nops = int(wid_arg), int(seed_arg), int(nops_arg)
    rng = random.Random(seed * 1000 + wid)
    prefix = b"w%d/" % wid
    names = [b"", b"\x00", b"\xff", b"a", b"aa", b"aaz", b"ab", b"b"] + [
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6))) for _ in range(30)]
    keys = sorted({prefix + n for n in names})
    model: dict[bytes, bytes] = {}
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    db = partydbm.open(path, "c", timeout=30)
    for i in range(nops):
        r = rng.random()
        key = rng.choice(keys)
        if r < 0.55:
            value = b"%d:%d" % (wid, i)
            note(f"I put {key.hex()} {value.hex()}")
            db[key] = value
            model[key] = value
            note("A")
        elif r < 0.70:
            note(f"I del {key.hex()}")
            try:
                del db[key]
                existed = True
            except KeyError:
                existed = False
            if existed != (key in model):
                return fail(f"op {i}: del {key!r} existed={existed}, model says {key in model}")
            model.pop(key, None)
            note("A")
        elif r < 0.80:
            ops = [(rng.choice(keys), None if rng.random() < 0.3 else b"b%d" % i)
                   for _ in range(rng.randrange(1, 6))]
            note("I batch " + " ".join(f"{k.hex()}={'' if v is None else v.hex()}"
                                       for k, v in ops))
            with db.write_batch() as wb:
                for k, v in ops:
                    wb.delete(k) if v is None else wb.put(k, v)
            for k, v in ops:
                model.pop(k, None) if v is None else model.__setitem__(k, v)
            note("A")
        elif r < 0.92:
            reverse = rng.random() < 0.5
            lo, hi = sorted(rng.sample(keys, 2))
            got = list(db.iterator(start=lo, stop=hi, include_stop=True, reverse=reverse))
            want = sorted((k, v) for k, v in model.items() if lo <= k <= hi)
            if reverse:
                want.reverse()
            if got != want:
                return fail(f"op {i}: iterator({lo!r}, {hi!r}, reverse={reverse}) "
                            f"gave {got!r}, model {want!r}")
            full = list(db.iterator(prefix=prefix, include_value=False))
            if full != sorted(model):
                return fail(f"op {i}: prefix scan gave {full!r}, model {sorted(model)!r}")
        else:
            if db.get(key) != model.get(key):
                return fail(f"op {i}: get {key!r} = {db.get(key)!r}, model {model.get(key)!r}")
    note("DONE")
    db.close()
    return 0


def fail(message: str) -> int:
    sys.stderr.write(f"torture worker: {message}\n")
    return 1
