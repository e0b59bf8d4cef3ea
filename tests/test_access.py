"""Access: another user gets nothing through the socket or the files of a database
created with mode 0o600; the socket and partydbm's files are no wider than `mode`; a
symlink or foreign file planted where the socket should be is neither followed nor
trusted, and a follower never talks to a leader that could not use the files itself.

Other-user cases need root (a probe drops to nobody, uid 65534) and skip elsewhere."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import partydbm
from partydbm._election import socket_address

from .procs import Party

SOCK = "partydbm.sock"
NOBODY = 65534
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="needs root to run a probe as another uid")


@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


# -- another user ----------------------------------------------------------------------------
FILES_PROBE = """
import json, os, socket, sys
import partydbm
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
path, names = sys.argv[1], json.loads(sys.argv[2])
out = {}
for flag in ("r", "w"):
    try:
        partydbm.open(path, flag, timeout=2).close()
        out["open-" + flag] = "opened"
    except partydbm.error as exc:
        out["open-" + flag] = "refused"
try:
    os.listdir(path)
    out["listdir"] = "listed"
except PermissionError:
    out["listdir"] = "refused"
for name in names:
    for how, flags in (("read", os.O_RDONLY), ("write", os.O_WRONLY)):
        try:
            os.close(os.open(os.path.join(path, name), flags))
            out[how + "-" + name] = "opened"
        except PermissionError:
            out[how + "-" + name] = "refused"
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    s.connect(os.path.join(path, "partydbm.sock"))
    out["socket"] = "connected"
except PermissionError:
    out["socket"] = "refused"
print(json.dumps(out))
"""


@needs_root
@pytest.mark.parametrize("directory", ["created", "existing-0755"])
def test_another_user_cannot_read_or_write_a_0o600_database_by_socket_or_files(
        party: Party, base: Path, directory: str) -> None:
    path = base / "db"
    if directory == "existing-0755":
        path.mkdir()
        os.chmod(path, 0o755)  # made by the user beforehand: partydbm narrows it
    leader = party.repl()
    assert leader.open(path, mode=0o600) == "leader"
    leader.exec("db['secret'] = 'kept'\ndb.sync()")
    names = sorted(p.name for p in path.iterdir())
    assert SOCK in names and "CURRENT" in names
    w = party.python(FILES_PROBE, path, json.dumps(names))
    line = w.readline()
    assert w.wait() == 0, w.stderr()
    out = json.loads(line or "{}")
    assert out and all(v == "refused" for v in out.values()), out
    assert leader.eval("dict(db.items())") == {b"secret": b"kept"}


# -- permission bits -------------------------------------------------------------------------
def _reachable_bits(path: Path, name: str) -> int:
    """The permission bits of a file in the database as far as each class of user can
    reach it: a class without x on the directory reaches none."""
    dir_bits = stat.S_IMODE(os.stat(path).st_mode)
    reach = sum(0o7 << shift for shift in (6, 3, 0) if dir_bits & (0o1 << shift))
    return stat.S_IMODE(os.lstat(path / name).st_mode) & reach


@pytest.mark.parametrize("umask", [0o022, 0o000])
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o660])
@pytest.mark.parametrize("directory", ["created", "existing-0777"])
def test_socket_and_files_are_no_wider_than_mode(
        tmp_path: Path, mode: int, umask: int, directory: str) -> None:
    path = tmp_path / "db"
    old = os.umask(umask)
    try:
        if directory == "existing-0777":
            path.mkdir()
            os.chmod(path, 0o777)
        with partydbm.open(path, "c", mode) as db:
            db[b"k"] = b"v"
            db.reorganize()  # a table file too
            allowed = mode & ~umask
            for name in (SOCK, "PARTYDBM", "LOCK"):
                bits = stat.S_IMODE(os.lstat(path / name).st_mode)
                assert bits & ~allowed == 0, (name, oct(bits), oct(allowed))
            assert stat.S_ISSOCK(os.lstat(path / SOCK).st_mode)
            dir_bits = stat.S_IMODE(os.stat(path).st_mode)
            assert dir_bits & ~(allowed | ((allowed & 0o444) >> 2)) == 0, oct(dir_bits)
            for p in path.iterdir():  # LevelDB's own files: reachable no wider
                if p.is_file():
                    bits = _reachable_bits(path, p.name)
                    assert bits & ~allowed == 0, (p.name, oct(bits), oct(allowed))
    finally:
        os.umask(old)


# -- planted things --------------------------------------------------------------------------
class Evil:
    """A listener of ours standing in for a foreign socket: counts connections."""

    def __init__(self, where: Path) -> None:
        self.path = where
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(where))
        self.sock.listen(8)
        self.sock.setblocking(False)

    def connections(self) -> int:
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("planted", ["symlink-to-socket", "symlink-to-file", "regular-file",
                                     "dangling-symlink"])
def test_what_is_planted_at_the_socket_path_is_replaced_not_followed_by_a_new_leader(
        tmp_path: Path, planted: str) -> None:
    path = tmp_path / "db"
    partydbm.open(path).close()
    partydbm.let_go(path)
    evil = Evil(tmp_path / "evil.sock")
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    os.chmod(target, 0o640)
    try:
        sock = path / SOCK
        if planted == "symlink-to-socket":
            sock.symlink_to(evil.path)
        elif planted == "symlink-to-file":
            sock.symlink_to(target)
        elif planted == "regular-file":
            sock.write_bytes(b"foreign")
        else:
            sock.symlink_to(tmp_path / "nowhere")
        with partydbm.open(path, mode=0o600) as db:
            assert db.is_leader
            db[b"k"] = b"v"
            assert stat.S_ISSOCK(os.lstat(sock).st_mode), "the planted thing is still there"
        assert evil.connections() == 0
        assert target.read_bytes() == b"precious"
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o640, "chmod followed a symlink"
        assert evil.path.exists()
    finally:
        evil.close()


@pytest.mark.parametrize("planted", ["symlink-to-socket", "regular-file"])
def test_a_follower_never_talks_to_a_symlink_or_file_where_the_socket_should_be(
        party: Party, tmp_path: Path, planted: str) -> None:
    """The leader's socket is swapped for a symlink to another socket (ours, so its uid
    is trusted: only 'not a socket' stops it) or a file: a new follower refuses and
    times out naming why, the other listener gets no connection."""
    path = tmp_path / "db"
    leader = party.repl()
    assert leader.open(path) == "leader"
    evil = Evil(tmp_path / "evil.sock")
    try:
        sock = path / SOCK
        sock.unlink()
        if planted == "symlink-to-socket":
            sock.symlink_to(evil.path)
        else:
            sock.write_bytes(b"foreign")
        with pytest.raises(partydbm.Timeout) as info:
            partydbm.open(path, timeout=1.0)
        kind = "a symlink" if planted == "symlink-to-socket" else "a regular file"
        assert f"not a socket ({kind})" in str(info.value), info.value
        assert evil.connections() == 0
    finally:
        evil.close()


SQUATTER = """
import os, socket, sys, threading
address = bytes.fromhex(sys.argv[1])
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(address if address.startswith(b"\\0") else os.fsdecode(address))
s.listen(64)
got = [0, 0]  # connections, bytes received

def serve():
    while True:
        conn, _ = s.accept()
        got[0] += 1
        conn.settimeout(5)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                got[1] += len(data)
        except OSError:
            pass
        conn.close()

threading.Thread(target=serve, daemon=True).start()
print("listening", flush=True)
sys.stdin.read()  # until the test is done
print("received", got[1], "bytes in", got[0], "connections", flush=True)
"""


@needs_root
@pytest.mark.parametrize("where", ["socket-file", "deep"])
def test_a_follower_never_talks_to_a_socket_served_by_a_user_who_could_not_use_the_files(
        party: Party, base: Path, where: str) -> None:
    """A plain LevelDB user holds the LOCK (no partydbm leader), and a socket served by
    another user is planted where the leader's goes: in the directory, also for a
    database too deep for a socket path (reached through /proc/self/fd or a symlink of
    ours). A follower must not send it a byte."""
    if where == "socket-file":
        path = base / "db"
    else:
        path = base / ("x" * 60) / ("y" * 60) / "db"
        path.parent.mkdir(parents=True)
        os.chmod(path.parent.parent, 0o755)
        os.chmod(path.parent, 0o755)
    partydbm.open(path, mode=0o600).close()
    partydbm.let_go(path)
    holder = party.spawn("plain_leveldb", path)
    assert holder.expect("ready") == ""
    address = socket_address(str(path))
    assert (address != str(path / SOCK)) == (where == "deep")
    nobody_dir = base / "nobody"
    nobody_dir.mkdir()
    os.chown(nobody_dir, NOBODY, NOBODY)
    bind_at = str(nobody_dir / "s")
    squatter = party.python(SQUATTER, os.fsencode(bind_at).hex())
    assert squatter.expect("listening") == ""
    os.rename(bind_at, path / SOCK)  # planted where the leader's socket goes
    with pytest.raises(partydbm.Timeout) as info:
        partydbm.open(path, timeout=1.5)
    assert "could not read and write" in str(info.value), info.value
    assert f"uid {NOBODY}" in str(info.value)
    assert squatter.proc.stdin is not None
    squatter.proc.stdin.close()
    received = squatter.expect("received").split()
    assert received[0] == "0" and int(received[3]) > 0, received  # connected, sent nothing
