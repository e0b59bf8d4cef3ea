"""Shared fixtures: every single-handle test runs in both roles.

`role` is "leader" (the handle under test is the process's own LevelDB user) or
"follower" (a Holder subprocess opened the path first and leads; the handle under test
talks to it over the socket). `open_db(flag="c", **kw)` opens the test's one fresh
path in that role, checks the role really is the one asked for, and closes whatever it
opened at teardown, before the Holder lets go of the path.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import partydbm

from .cli_run import info_json
from .procs import Holder

ROLES = ("leader", "follower")

# A run started in the background of a shell without job control (`make test &`, nohup,
# a CI runner's subshell) inherits SIGINT ignored, and an ignored signal stays ignored
# across exec: every worker would then ignore the SIGINT the tests send it
# (test_signals.py, test_cli_processes.py), and a leader would write on for ever. A
# handled signal is reset to its default at exec: handle it here, as Python does.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (make test): one worker more than there are CPUs. Much of the suite
    waits (on other processes, on timeouts, on handovers), and the extra worker fills
    those waits: on 2 CPUs, 67-82 s against 98-106 s with two workers, measured back to
    back on a shared machine."""
    return len(os.sched_getaffinity(0)) + 1


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `pytest -n N --dist loadgroup` (make test) every test marked `heavy` runs
    on one worker, one at a time: they start many processes at once, or kill leaders
    inside timing windows, so they must not compete with each other for the CPUs. The
    rest (one process, or a few processes that take turns) spreads over the others."""
    for item in items:
        if item.get_closest_marker("heavy") is not None:
            item.add_marker(pytest.mark.xdist_group("heavy"))


@pytest.fixture(scope="module")
def holder() -> Iterator[Holder]:
    """One holder process per test module (cheap); always reaped."""
    h = Holder(timeout=30.0)
    try:
        yield h
    finally:
        h.close()
        assert h.proc.poll() is not None, "holder process left behind"


@pytest.fixture(params=ROLES)
def role(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Opener:
    """Opens the test's database path in the test's role; remembers what it opened."""

    def __init__(self, path: Path, role: str, holder: Holder | None) -> None:
        self.path = path
        self.role = role
        self.holder = holder
        self.handles: list[partydbm.PartyDBM] = []
        self._shared: partydbm.PartyDBM | None = None

    def __call__(self, flag: str = "c", **kw: Any) -> partydbm.PartyDBM:
        db = partydbm.open(self.path, flag, **kw)
        self.handles.append(db)
        assert db.is_leader is (self.role == "leader"), (
            f"asked for a {self.role} handle, got is_leader={db.is_leader}")
        return db

    def shared(self, flag: str = "c") -> partydbm.PartyDBM:
        """One handle for the whole test, opened on first use (for hypothesis tests,
        whose examples all run inside one test and its fixtures)."""
        if self._shared is None:
            self._shared = self(flag)
        return self._shared

    def close_all(self) -> None:
        for db in self.handles:
            db.close()


@pytest.fixture
def open_db(role: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Opener]:
    """An opener for a fresh path (tmp_path/"db"). In the follower role the module's
    Holder has opened (and so created) the path first and leads it."""
    path = tmp_path / "db"
    h: Holder | None = None
    if role == "follower":
        h = request.getfixturevalue("holder")
        assert h.open(path, "c") == "leader"
    opener = Opener(path, role, h)
    try:
        yield opener
    finally:
        # Our handles first: were the holder to let go while we still had the path
        # open, this process would take over and a later test would see a wrong role.
        opener.close_all()
        if h is not None:
            h.close_db(path)


@pytest.fixture
def base() -> Iterator[Path]:
    """A world-traversable directory (pytest's tmp_path is 0700: another user could
    reach nothing there whatever the database's mode, which would prove nothing)."""
    path = Path(tempfile.mkdtemp(prefix="partydbm-access-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


PLYVEL_PROBE = """
import sys
from partydbm._backend import plyvel  # the binding partydbm uses here
try:
    plyvel.DB(sys.argv[1]).close()
except plyvel.IOError as exc:
    print("LOCKED", exc)
    sys.exit(3)
print("OPENED")
"""


def _plyvel_can_open(path: str | os.PathLike[str]) -> bool:
    """Whether a plain LevelDB user in a fresh process can open `path` right now (it
    cannot while any process holds LevelDB's LOCK on it)."""
    proc = subprocess.run([sys.executable, "-c", PLYVEL_PROBE, os.fspath(path)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode == 3:
        assert "Resource temporarily unavailable" in proc.stdout, proc.stdout
        return False
    assert proc.returncode == 0 and "OPENED" in proc.stdout, (proc.stdout, proc.stderr)
    return True


PlyvelProbe = Callable[[str | os.PathLike[str]], bool]


@pytest.fixture
def plyvel_can_open() -> PlyvelProbe:
    """The probe above, as a fixture (test modules do not import conftest)."""
    return _plyvel_can_open


@pytest.fixture(params=["alone", "led"])
def dbpath(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A database path for a command-line test. 'alone': nobody holds it, so the command
    leads; 'led': the module's Holder leads it, so the command follows."""
    path = tmp_path / "db"
    if request.param == "alone":
        yield path
        return
    holder: Holder = request.getfixturevalue("holder")
    assert holder.open(path, "c") == "leader"
    try:
        yield path
        assert info_json(path)["leader_pid"] == holder.pid, "the holder no longer leads"
    finally:
        holder.close_db(path)
