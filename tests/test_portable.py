"""The ways partydbm works where Linux's are missing (macOS, the BSDs), run here by
switching the Linux way off, in this process and in every worker the test starts
(`linux_off`, through module attributes of partydbm): peer credentials without
SO_PEERCRED, deep paths without /proc, the socket's bits without fchmod() before
bind(), the LOCK holder's pid in another struct flock layout or none, a connection's
end without POLLRDHUP, and serving threads without per-thread niceness.

Where a way is switched off, the existing tests of what it guarantees run again
through the fallback (called from here with the fixtures they need)."""

from __future__ import annotations

import ast
import errno
import fcntl
import importlib
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import partydbm
from partydbm import _election, _server, _sockets
from partydbm._election import LockFile, socket_address

from . import test_access, test_election
from .procs import Party, RemoteError, wait_for
from .workers import SETTINGS

needs_root = test_access.needs_root
SOCK = "partydbm.sock"


@pytest.fixture
def party() -> Iterator[Party]:
    with Party() as p:
        yield p


@pytest.fixture
def linux_off(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """linux_off("_sockets.SO_PEERCRED=None", ...): set these module attributes of
    partydbm here and in every worker started afterwards."""
    def switch(*settings: str) -> None:
        for setting in settings:
            target, value = setting.split("=", 1)
            module, attr = target.rsplit(".", 1)
            monkeypatch.setattr(importlib.import_module(f"partydbm.{module}"), attr,
                                ast.literal_eval(value))
        monkeypatch.setenv(SETTINGS, ";".join(settings))
    return switch


@pytest.fixture
def short_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A temporary directory of the test's own for the private symlinks of deep paths
    (sticky and world-writable like /tmp, so a probe of another uid makes its own
    there too), removed afterwards."""
    path = tempfile.mkdtemp(prefix="pdb", dir="/tmp")
    os.chmod(path, 0o1777)
    monkeypatch.setenv("TMPDIR", path)
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- peer credentials ------------------------------------------------------------------------
XUCRED = struct.Struct("IIh16I")


def xucred(version: int, uid: int, groups: list[int]) -> bytes:
    return XUCRED.pack(version, uid, len(groups), *groups, *[0] * (16 - len(groups)))


def test_xucred_is_read_as_macos_and_the_bsds_lay_it_out() -> None:
    assert _sockets.parse_xucred(xucred(0, 501, [20, 12, 61]), 77) == (77, 501, 20,
                                                                       {20, 12, 61})
    assert _sockets.parse_xucred(xucred(0, 0, [0]) + b"\0" * 12, 0) == (0, 0, 0, {0})
    for raw in (xucred(1, 501, [20]), xucred(0, 501, []), xucred(0, 501, [20])[:-1]):
        assert _sockets.parse_xucred(raw, 77) == _sockets.UNKNOWN


class FakeSock:
    """getsockopt() answering as macOS would: LOCAL_PEERCRED and LOCAL_PEERPID at level 0."""

    def __init__(self, answers: dict[tuple[int, int], bytes]) -> None:
        self.answers = answers

    def getsockopt(self, level: int, opt: int, size: int) -> bytes:
        try:
            return self.answers[level, opt][:size]
        except KeyError:
            raise OSError(errno.ENOPROTOOPT, "no such option") from None


def test_peer_credentials_come_from_local_peercred_where_there_is_no_so_peercred(
        linux_off: Callable[..., None]) -> None:
    linux_off("_sockets.SO_PEERCRED=None", "_sockets.LOCAL_PEERCRED=1",
              "_sockets.LOCAL_PEERPID=2")
    pid = (4242).to_bytes(4, "little" if struct.pack("=i", 1)[0] else "big")
    sock = FakeSock({(0, 1): xucred(0, 501, [20, 80]), (0, 2): pid})
    assert _sockets.peer_credentials(sock) == (4242, 501, 20, {20, 80})  # type: ignore[arg-type]
    no_pid = FakeSock({(0, 1): xucred(0, 501, [20])})
    assert _sockets.peer_credentials(no_pid) == (0, 501, 20, {20})  # type: ignore[arg-type]
    assert _sockets.peer_credentials(FakeSock({})) == _sockets.UNKNOWN  # type: ignore[arg-type]


def test_peer_credentials_are_unknown_where_the_kernel_has_no_way_to_tell(
        linux_off: Callable[..., None]) -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert _sockets.peer_credentials(a)[:3] == (os.getpid(), os.geteuid(), os.getegid())
        linux_off("_sockets.SO_PEERCRED=None")
        assert _sockets.peer_credentials(a) == _sockets.UNKNOWN


NO_CREDS = "_sockets.SO_PEERCRED=None"


def test_followers_work_without_peer_credentials(
        party: Party, tmp_path: Path, linux_off: Callable[..., None]) -> None:
    linux_off(NO_CREDS)
    test_election.test_leader_closing_its_last_handle_hands_over(party, tmp_path)


@needs_root
def test_another_user_gets_nothing_without_peer_credentials(
        party: Party, base: Path, linux_off: Callable[..., None]) -> None:
    """The socket file's bits keep another user out (the kernel checks them)."""
    linux_off(NO_CREDS)
    test_access.test_another_user_cannot_read_or_write_a_0o600_database_by_socket_or_files(
        party, base, "created")
    test_election.test_another_uid_cannot_use_the_database_through_the_socket(
        party, "socket-file")


@needs_root
@pytest.mark.parametrize("where", ["socket-file", "deep"])
def test_a_follower_without_peer_credentials_judges_the_socket_files_owner(
        party: Party, base: Path, linux_off: Callable[..., None], where: str) -> None:
    """Another user's socket planted at the leader's address: its owner could not use
    the files, so a follower sends it nothing."""
    linux_off(NO_CREDS)
    test_access.test_a_follower_never_talks_to_a_socket_served_by_a_user_who_could_not_use_the_files(
        party, base, where)


# -- deep paths without /proc ----------------------------------------------------------------
NO_PROC = "_election.VIA_PROC=False"


def _deep(tmp_path: Path) -> str:
    path = tmp_path / ("d" * 60) / ("e" * 60) / "db"
    path.mkdir(parents=True)
    return str(path)


def test_a_deep_path_is_reached_through_a_private_symlink_without_proc(
        tmp_path: Path, short_tmp: str, linux_off: Callable[..., None]) -> None:
    linux_off(NO_PROC)
    path = _deep(tmp_path)
    address = socket_address(path)
    private = os.path.join(short_tmp, f"partydbm-{os.geteuid()}")
    assert os.path.dirname(os.path.dirname(address)) == private
    assert len(os.fsencode(address)) <= _election.MAX_UNIX_PATH
    assert os.readlink(os.path.dirname(address)) == os.path.realpath(path)
    st = os.lstat(private)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert _election.shown_address(path, address) == os.path.join(os.path.realpath(path), SOCK)
    shutil.rmtree(private)  # a temporary-file cleaner went by
    _election.relink(address)
    assert os.readlink(os.path.dirname(address)) == os.path.realpath(path)


@needs_root
def test_a_private_directory_of_another_users_is_refused(
        tmp_path: Path, short_tmp: str, linux_off: Callable[..., None]) -> None:
    linux_off(NO_PROC)
    private = os.path.join(short_tmp, f"partydbm-{os.geteuid()}")
    os.mkdir(private, 0o777)
    os.chown(private, 65534, 65534)  # made first by someone else in a shared /tmp
    with pytest.raises(partydbm.error) as info:
        socket_address(_deep(tmp_path))
    assert info.value.errno == errno.EPERM and "uid 65534" in str(info.value)


def test_a_deep_path_under_a_deep_temporary_directory_falls_back_to_tmp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        linux_off: Callable[..., None]) -> None:
    linux_off(NO_PROC)
    monkeypatch.setattr(tempfile, "tempdir", _deep(tmp_path))
    address = socket_address(_deep(tmp_path / "x"))
    assert address.startswith(f"/tmp/partydbm-{os.geteuid()}/")
    os.unlink(os.path.dirname(address))
    try:
        os.rmdir(os.path.dirname(os.path.dirname(address)))
    except OSError:
        pass  # other symlinks of ours in it (another run's)


def test_deep_paths_work_with_followers_without_proc(
        party: Party, tmp_path: Path, short_tmp: str, linux_off: Callable[..., None]) -> None:
    linux_off(NO_PROC)
    test_election.test_database_too_deep_for_a_socket_path_works_with_followers(party, tmp_path)


@needs_root
def test_another_uid_gets_nothing_from_a_deep_database_without_proc(
        party: Party, short_tmp: str, linux_off: Callable[..., None]) -> None:
    linux_off(NO_PROC)
    test_election.test_another_uid_cannot_use_the_database_through_the_socket(party, "deep")


def test_a_deep_database_is_reached_again_after_its_symlink_is_removed(
        party: Party, tmp_path: Path, short_tmp: str, linux_off: Callable[..., None]) -> None:
    """A temporary-file cleaner removes the private symlinks while processes have the
    database open: a new leader binds and an old follower reconnects all the same."""
    linux_off(NO_PROC)
    path = _deep(tmp_path)
    private = os.path.join(short_tmp, f"partydbm-{os.geteuid()}")
    a, b = party.repl(), party.repl()
    c = party.repl(env={"PARTYDBM_NEVER_LEAD": "1"})
    assert [w.open(path) for w in (a, b, c)] == ["leader", "follower", "follower"]
    a.exec("db['a'] = '1'")
    shutil.rmtree(private)
    a.kill()  # b takes over: it binds through its address, made again
    wait_for(lambda: b.eval("db.is_leader"), what="b leads")
    shutil.rmtree(private)
    c.exec("db['c'] = '1'")  # c reconnects (to b) through its address, made again
    assert b.eval("dict(db.items())") == {b"a": b"1", b"c": b"1"}
    assert os.readlink(os.path.dirname(b.eval("db._engine.address"))) == os.path.realpath(path)


# -- the socket's bits without fchmod() before bind() -------------------------------------
NO_FCHMOD = "_sockets.FCHMOD_BEFORE_BIND=False"


@pytest.mark.parametrize("umask", [0o022, 0o000])
@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_socket_bound_privately_is_no_wider_than_mode(
        tmp_path: Path, linux_off: Callable[..., None], mode: int, umask: int) -> None:
    linux_off(NO_FCHMOD)
    test_access.test_socket_and_files_are_no_wider_than_mode(tmp_path, mode, umask, "created")
    assert [p.name for p in (tmp_path / "db").iterdir() if p.name.startswith(".p")] == []


@pytest.mark.parametrize("planted", ["symlink-to-socket", "symlink-to-file", "regular-file",
                                     "dangling-symlink"])
def test_socket_bound_privately_replaces_what_is_planted_without_following_it(
        tmp_path: Path, linux_off: Callable[..., None], planted: str) -> None:
    linux_off(NO_FCHMOD)
    test_access.test_what_is_planted_at_the_socket_path_is_replaced_not_followed_by_a_new_leader(
        tmp_path, planted)


def test_a_failed_private_bind_leaves_nothing_behind(
        tmp_path: Path, linux_off: Callable[..., None]) -> None:
    linux_off(NO_FCHMOD)
    (tmp_path / SOCK).mkdir()  # rename() cannot replace a directory
    with pytest.raises(OSError):
        _sockets.listen(str(tmp_path / SOCK), 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SOCK]


def test_followers_work_with_every_fallback_at_once(
        party: Party, tmp_path: Path, short_tmp: str, linux_off: Callable[..., None]) -> None:
    linux_off(NO_CREDS, NO_PROC, NO_FCHMOD, "_sockets.POLLRDHUP=0",
              "_election.FLOCK_LAYOUT=None", "_server.PER_THREAD_NICENESS=False")
    test_election.test_database_too_deep_for_a_socket_path_works_with_followers(party, tmp_path)


# -- the LOCK holder's pid ---------------------------------------------------------------------
def test_the_lock_holders_pid_is_read_in_the_bsd_struct_flock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS and the BSDs lay struct flock out as l_start, l_len, l_pid, l_type,
    l_whence: a kernel answering so (faked here) is read right, and an answer that no
    lock could be (a wrong layout) names nobody."""
    answer: list[bytes] = []
    asked: list[tuple[int, ...]] = []

    def kernel(fd: int, cmd: int, arg: bytes) -> bytes:
        assert cmd == fcntl.F_GETLK
        asked.append(struct.unpack_from("qqihh", arg))
        return answer.pop()

    lock = LockFile(str(tmp_path))
    try:
        monkeypatch.setattr(_election, "FLOCK_LAYOUT", _election._FLOCK_BSD)
        monkeypatch.setattr(fcntl, "fcntl", kernel)
        for ltype, pid, expect in ((fcntl.F_WRLCK, 4242, 4242), (fcntl.F_RDLCK, 7, 7),
                                   (fcntl.F_UNLCK, 0, None), (0x7777, 4242, None)):
            answer.append(struct.pack("qqihh8x", 0, 0, pid, ltype, os.SEEK_SET))
            assert lock.holder_pid() == expect
        assert asked == [(0, 0, 0, fcntl.F_WRLCK, os.SEEK_SET)] * 4
    finally:
        lock.close()


def test_without_a_struct_flock_layout_messages_name_no_pid(
        party: Party, tmp_path: Path, linux_off: Callable[..., None]) -> None:
    path = tmp_path / "db"
    partydbm.open(path).close()
    partydbm.let_go(path)
    plain = party.spawn("plain_leveldb", path)
    assert plain.expect("ready") == ""
    lock = LockFile(str(path))
    try:
        assert lock.holder_pid() == plain.pid
        linux_off("_election.FLOCK_LAYOUT=None")
        assert lock.holder_pid() is None
    finally:
        lock.close()
    prober, repairer = party.repl(), party.repl()
    with pytest.raises(RemoteError) as info:
        prober.open(path, timeout=0.5)
    assert info.value.isa("Timeout"), info.value
    assert "cannot tell" in info.value.message and str(plain.pid) not in info.value.message
    with pytest.raises(RemoteError) as busy:
        repairer.exec(f"partydbm.repair({str(path)!r})")
    assert "process ? holds" in busy.value.message, busy.value
    plain.kill()
    assert prober.open(path) == "leader"


# -- a connection's end without POLLRDHUP -------------------------------------------------------
@pytest.mark.parametrize("pollrdhup", ["linux", "none"])
def test_an_idle_follower_takes_the_lead_when_its_leader_dies(
        party: Party, tmp_path: Path, linux_off: Callable[..., None], pollrdhup: str) -> None:
    """The follower asks for nothing: only its wait for the connection's end makes it
    contend for the LOCK (with POLLRDHUP, or POLLHUP where poll() has no POLLRDHUP)."""
    if pollrdhup == "none":
        linux_off("_sockets.POLLRDHUP=0")
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    assert follower.open(path) == "follower"
    follower.exec("db['k'] = 'v'")
    lock = LockFile(str(path))  # only to ask who holds the LOCK (never locks)
    try:
        leader.kill()
        wait_for(lambda: lock.holder_pid() == follower.pid, what="the follower leads")
    finally:
        lock.close()
    wait_for(lambda: follower.eval("db.is_leader"), what="the follower serves")
    assert follower.eval("db['k']") == b"v"


# -- serving threads without per-thread niceness --------------------------------------------
def test_without_per_thread_niceness_serving_threads_keep_the_leaders_priority(
        party: Party, tmp_path: Path, linux_off: Callable[..., None]) -> None:
    linux_off("_server.PER_THREAD_NICENESS=False")
    path = tmp_path / "db"
    leader, follower = party.repl(), party.repl()
    assert leader.open(path) == "leader"
    assert follower.open(path) == "follower"
    follower.exec("db[b'k'] = b'v'")
    nice = leader.eval("{t.name: os.getpriority(os.PRIO_PROCESS, t.native_id) "
                       "for t in threading.enumerate()}")
    jobs = {name.split()[0] for name in nice}  # "partydbm-serve pid N fd N PATH"
    assert "partydbm-serve" in jobs and set(nice.values()) == {nice["MainThread"]}, nice


def test_without_sched_getaffinity_the_cpus_are_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")
    assert _server._usable_cpus() == (os.cpu_count() or 1)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    expect = mine + _server.SERVE_NICENESS if (os.cpu_count() or 1) >= 2 else None
    assert _server._serving_niceness() == expect
