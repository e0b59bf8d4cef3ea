"""Handles inherited through fork: multiprocessing's fork start method, and os.fork."""

from __future__ import annotations

import multiprocessing
import os
import select
import sys
import time
import traceback
from typing import Any

import partydbm
from tests.wire import decode, encode

from . import DEADLINE, report, write_range

# A module global: the handle must outlive the function (closed at interpreter exit).
db: Any = None


def _recv(conn: Any, timeout: float = DEADLINE) -> Any:
    try:
        if not conn.poll(timeout):
            return {"error": f"no message within {timeout}s"}
        return decode(conn.recv())
    except EOFError:
        return {"error": "the child went away without a message"}


def _join(procs: list[Any], timeout: float = DEADLINE) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.001))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    return [p.exitcode for p in procs]


def _guarded(conn: Any, fn: Any, *args: Any) -> None:
    """Run a child's body; whatever happens, the parent gets one message."""
    try:
        conn.send(encode(fn(*args)))
    except BaseException:
        conn.send(encode({"error": traceback.format_exc()}))


def _inherited_use(handle: Any, i: int, n: int) -> dict[str, Any]:
    res: dict[str, Any] = {"is_leader": handle.is_leader, "parent": handle.get("parent")}
    write_range(handle, f"c{i}-%03d", n, f"v{i}-%d")
    res["own"] = dict(handle.iterator(prefix=f"c{i}-"))
    res["is_leader_after"] = handle.is_leader
    return res


def _lead_and_fork_two(path: str, child: Any, duplex: bool
                       ) -> tuple[Any, dict[str, Any], list[Any], list[Any]]:
    """Open `path` (this process leads), write b"parent", and fork two children that
    run child(conn, i, handle); (handle, report so far, our pipe ends, the children)."""
    ctx = multiprocessing.get_context("fork")
    handle = partydbm.open(path)
    out: dict[str, Any] = {"parent_leader": handle.is_leader}
    handle["parent"] = "p"
    conns, procs = [], []
    for i in range(2):
        mine, theirs = ctx.Pipe(duplex=duplex)
        p = ctx.Process(target=child, args=(theirs, i, handle))
        p.start()
        theirs.close()  # the child's end: our recv() sees EOF if the child dies
        conns.append(mine)
        procs.append(p)
    return handle, out, conns, procs


def _inherited_child(conn: Any, i: int, handle: Any) -> None:
    _guarded(conn, _inherited_use, handle, i, 50)


def fork_from_leader(path: str) -> None:
    """The parent leads; two forked children use the inherited handle."""
    handle, out, conns, procs = _lead_and_fork_two(path, _inherited_child, duplex=False)
    out["children"] = [_recv(c) for c in conns]
    out["exitcodes"] = _join(procs)
    out["parent_leader_after"] = handle.is_leader
    out["items"] = dict(handle.items())
    handle.close()
    report(out)


def _write_through_close(handle: Any, i: int, conn: Any) -> dict[str, Any]:
    """Keep writing; once told the parent closed, write 100 more."""
    j, closed_at = 0, None
    deadline = time.monotonic() + DEADLINE
    while closed_at is None or j < closed_at + 100:
        handle[b"c%d-%04d" % (i, j)] = b"v%d" % j
        j += 1
        if j == 20:
            conn.send("started")
        if closed_at is None and conn.poll():
            conn.recv()
            closed_at = j
        if time.monotonic() > deadline:
            raise TimeoutError(f"child {i}: {j} writes, parent closed at {closed_at}")
        time.sleep(0.001)
    own = dict(handle.iterator(prefix=b"c%d-" % i))
    return {"n": j, "closed_at": closed_at, "own_ok": own == {
        b"c%d-%04d" % (i, k): b"v%d" % k for k in range(j)}, "late": _late_writes(handle, i)}


def _late_writes(handle: Any, i: int) -> dict[bytes, bytes]:
    """Child 1 writes again after child 0 (and anything child 0 started) has gone."""
    if i != 1:
        return {}
    time.sleep(0.5)
    return write_range(handle, "late-%02d", 10, "l%d")


def fork_outlive_close(path: str) -> None:
    """The parent leads, forks two writers, and closes its handle while they write."""
    handle, out, conns, procs = _lead_and_fork_two(path, _guarded_duplex, duplex=True)
    out["started"] = [_recv_raw(c) for c in conns]
    handle.close()
    for c in conns:
        c.send("closed")
    out["children"] = [_recv(c) for c in conns]
    out["exitcodes"] = _join(procs)
    report(out)


def _guarded_duplex(conn: Any, i: int, handle: Any) -> None:
    try:
        conn.send(encode(_write_through_close(handle, i, conn)))
    except BaseException:
        conn.send(encode({"error": traceback.format_exc()}))


def _recv_raw(conn: Any, timeout: float = DEADLINE) -> Any:
    if not conn.poll(timeout):
        return f"nothing within {timeout}s"
    return conn.recv()


def fork_outlive_exit(path: str) -> None:
    """The parent leads, forks two children (os.fork) and exits without closing; the
    children wait for the parent to be gone (EOF on a pipe only it holds), then write."""
    global db
    db = partydbm.open(path)
    db["parent"] = "p"
    sys.stdout.flush()
    r, w = os.pipe()
    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            os.close(w)
            _exit_child(db, i, r)
        pids.append(pid)
    os.close(r)
    db["parent-last"] = "x"
    report({"parent": os.getpid(), "leader": db.is_leader, "children": pids})
    # Falls off the end with the handle open: interpreter exit hands over.


def _exit_child(handle: Any, i: int, r: int) -> None:
    code = 1
    try:
        handle[f"c{i}-early"] = "e"
        ready, _, _ = select.select([r], [], [], DEADLINE)
        if not ready or os.read(r, 1) != b"":
            raise TimeoutError("the parent did not exit")
        written = write_range(handle, f"c{i}-%03d", 50, f"v{i}-%d")
        own = dict(handle.iterator(prefix=f"c{i}-"))
        report({"child": i, "ok": own == {**written, f"c{i}-early".encode(): b"e"},
                "parent": handle.get("parent"), "parent_last": handle.get("parent-last"),
                "late": _late_writes(handle, i)})
        code = 0
    except BaseException:
        report({"child": i, "error": traceback.format_exc()})
    finally:
        os._exit(code)


def fork_from_follower(path: str) -> None:
    """The parent follows (the test's leader L leads); its forked child uses the inherited
    handle, the parent closes, the test kills L, and the child must become the leader
    itself."""
    ctx = multiprocessing.get_context("fork")
    handle = partydbm.open(path)
    out: dict[str, Any] = {"parent_leader": handle.is_leader}
    handle["parent-before"] = "b"
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_follower_child, args=(handle, theirs))
    p.start()
    out["child_first"] = _recv(mine)
    handle["parent-after-fork"] = "a"
    out["parent_sees_child"] = handle.get("child-1")
    handle.close()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected go")
    mine.send("go")
    out["child_second"] = _recv(mine)
    out["exitcodes"] = _join([p])
    report(out)


def _follower_child(handle: Any, conn: Any) -> None:
    try:
        first = {"is_leader": handle.is_leader, "parent": handle.get("parent-before")}
        handle["child-1"] = "1"
        conn.send(encode(first))
        if not conn.poll(DEADLINE):
            raise TimeoutError("no go")
        conn.recv()
        written = write_range(handle, "child-2-%02d", 20, "%d")
        conn.send(encode({"is_leader": handle.is_leader, "written_ok": all(
            handle[k] == v for k, v in written.items()), "items": dict(handle.items())}))
    except BaseException:
        conn.send(encode({"error": traceback.format_exc()}))


def fork_leader_returns(path: str) -> None:
    """The parent leads, forks a child, closes, and leads again at once (before the
    helper the child started for itself is up); then the parent leaves for good."""
    ctx = multiprocessing.get_context("fork")
    handle = partydbm.open(path)
    out: dict[str, Any] = {"parent_leader": handle.is_leader}
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_returning_child, args=(handle, theirs))
    p.start()
    out["forked"] = _recv(mine)
    handle.close()
    mine.send("write")  # no leader now: the child starts its helper
    time.sleep(0.01)
    handle = partydbm.open(path)  # ...and the parent is back (usually) first
    out["parent_leads_again"] = handle.is_leader
    out["second"] = _recv(mine)
    time.sleep(1.0)  # the child's helper comes up meanwhile, and follows the parent
    handle.close()  # the parent leaves for good
    mine.send("write")
    out["third"] = _recv(mine)
    out["exitcodes"] = _join([p])
    report(out)


def _returning_child(handle: Any, conn: Any) -> None:
    try:
        for n in range(3):
            if n:
                if not conn.poll(DEADLINE):
                    raise TimeoutError("the parent said nothing")
                conn.recv()
            written = write_range(handle, f"c{n}-%02d", 5, "%d")
            conn.send(encode({"ok": all(handle[k] == v for k, v in written.items()),
                              "is_leader": handle.is_leader}))
    except BaseException:
        conn.send(encode({"error": traceback.format_exc()}))
