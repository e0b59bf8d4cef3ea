"""The role of the handle under test: the leader, or a follower of another process.

Every conformance class exists once per role. In the "follower" role a Holder process
(`tests.procs.Holder`) opens each database before the test does, so the test's own
handle reaches LevelDB only through the leader's socket:

- before the test's open, the holder opens the path (creating it when the test's flag
  would create it) and must answer that it leads;
- the test's handle must then be a follower (checked on every open, in both roles);
- when the test's last handle on a path closes, the holder closes it too, so the next
  open meets a fresh leader, and a test that deletes the path afterwards does not pull
  a directory from under an open LevelDB.

Everything is patched with `unittest.mock` for one test at a time: `partydbm.open` in
both roles, `PartyDBM.close` in the follower role (to see handles close).
"""

from __future__ import annotations

import os
import weakref
from typing import Any
from unittest import mock

import partydbm
from tests.procs import Holder

ROLES = ("leader", "follower")
HOLDER_TIMEOUT = 30.0  # seconds for any one answer from the holder process

_REAL_OPEN = partydbm.open
_REAL_CLOSE = partydbm.PartyDBM.close
_SUFFIXES = frozenset(partydbm.open_flags) - frozenset("rwcn")


def _valid_flag(flag: object) -> bool:
    return (isinstance(flag, str) and len(flag) >= 1 and flag[0] in "rwcn"
            and set(flag[1:]) <= _SUFFIXES)


def _abspath(file: Any) -> str | None:
    """The path the holder should open for `file`, or None when there is none."""
    try:
        path = os.fsdecode(os.fspath(file))
    except (TypeError, ValueError):
        return None
    return os.path.abspath(path) if path else None


class RoleSession:
    """One test's role: the patches, and (follower) which paths the holder holds."""

    def __init__(self, role: str, holder: Holder | None) -> None:
        if role not in ROLES or (role == "follower") != (holder is not None):
            raise ValueError(f"bad role setup: {role!r} with holder {holder!r}")
        self.role = role
        self.holder = holder
        self.opens = 0
        self._held: dict[str, int] = {}  # path the holder holds -> open test handles on it
        self._handles: dict[int, tuple[weakref.ref[Any], str]] = {}  # id(handle) -> path
        self._pending: list[str] = []  # paths to hand back to the holder
        self._busy = False  # mid-conversation with the holder (a __del__ may close then)
        self._patchers: list[Any] = []
        self._took_over: list[str] = []  # handles that were the leader when they closed

    def start(self) -> None:
        self._patchers.append(mock.patch.object(partydbm, "open", self._open))
        if self.role == "follower":
            session = self

            def close(db: partydbm.PartyDBM) -> None:
                session._check_still_following(db)
                _REAL_CLOSE(db)
                session._closed(db)

            self._patchers.append(mock.patch.object(partydbm.PartyDBM, "close", close))
        for patcher in self._patchers:
            patcher.start()

    def stop(self) -> None:
        while self._patchers:
            self._patchers.pop().stop()

    def finish(self) -> None:
        """End of the test (idempotent): close what the test left open, and have the
        holder let go of every path, before the test's files are removed."""
        if self.role != "follower":
            return
        for ref, _path in list(self._handles.values()):
            db = ref()
            if db is not None:
                db.close()  # a follower engine must not outlive its leader's hold
        self._handles.clear()
        self._pending.extend(path for path in self._held if path not in self._pending)
        self._held.clear()
        self._flush()
        if self._took_over:
            paths, self._took_over = self._took_over, []
            raise AssertionError(f"follower role: the test's handle became the leader of "
                                 f"{paths} before it closed (the holder lost the database)")

    # -- open and close ------------------------------------------------------------------
    def _open(self, file: Any, flag: str = "c", mode: int = 0o666,
              **kwargs: Any) -> partydbm.PartyDBM:
        if self.role == "leader":
            return self._checked(_REAL_OPEN(file, flag, mode, **kwargs))
        self._flush()
        path = self._hold(file, flag)
        try:
            db = self._checked(_REAL_OPEN(file, flag, mode, **kwargs))
        except BaseException:
            if path is not None and self._held.get(path) == 0:
                self._release(path)
            raise
        if path is not None:
            self._handles[id(db)] = (weakref.ref(db), path)
            self._held[path] += 1
        return db

    def _checked(self, db: partydbm.PartyDBM) -> partydbm.PartyDBM:
        if db.is_leader != (self.role == "leader"):
            what = "the leader" if db.is_leader else "a follower"
            db.close()
            raise AssertionError(f"{self.role} role: the test's handle on {db.name!r} "
                                 f"is {what}")
        self.opens += 1
        return db

    def _check_still_following(self, db: partydbm.PartyDBM) -> None:
        if id(db) in self._handles:
            try:
                if db.is_leader:
                    self._took_over.append(db.name)
            except partydbm.ClosedError:
                pass

    def _closed(self, db: partydbm.PartyDBM) -> None:
        entry = self._handles.pop(id(db), None)
        if entry is None:
            return  # closed before, or never ours
        path = entry[1]
        self._held[path] -= 1
        if self._held[path] == 0:
            self._release(path)

    # -- the holder ------------------------------------------------------------------------
    def _hold(self, file: Any, flag: Any) -> str | None:
        """Have the holder open `file` first; the path it holds, or None when the test's
        own open must fail anyway (bad flag, 'r'/'w' on a missing database, ...)."""
        path = _abspath(file)
        if path is None or not _valid_flag(flag):
            return None
        if path in self._held:
            return path
        if partydbm.whichdb(path) == "partydbm":
            holder_flag = "r"  # an existing database: just lead it
        elif flag[0] in "cn":
            holder_flag = flag[0]  # create it as the test would
        else:
            return None
        assert self.holder is not None
        try:
            role = self._ask(self.holder.open, path, holder_flag)
        except RuntimeError:
            return None  # the holder could not open it: the test's own open will say why
        if role != "leader":
            raise AssertionError(f"the holder opened {path!r} as {role!r}, not as the leader: "
                                 "this process still holds the database")
        self._held[path] = 0
        return path

    def _release(self, path: str) -> None:
        del self._held[path]
        self._pending.append(path)
        self._flush()

    def _flush(self) -> None:
        while self._pending and not self._busy:
            path = self._pending.pop(0)
            if path not in self._held:
                assert self.holder is not None
                self._ask(self.holder.close_db, path)

    def _ask(self, method: Any, *args: Any) -> Any:
        self._busy = True
        try:
            return method(*args)
        finally:
            self._busy = False


class RoleMixin:
    """Put before a CPython test class; `role` says which side the handle is on. One
    holder process per class in the follower role, reaped at class teardown."""

    role = "leader"
    _holder: Holder | None = None

    @classmethod
    def setUpClass(cls) -> None:
        if cls.role == "follower":
            holder = cls._holder = Holder(timeout=HOLDER_TIMEOUT)
            cls.addClassCleanup(holder.close)  # type: ignore[attr-defined]
        super().setUpClass()  # type: ignore[misc]

    def setUp(self) -> None:
        session = self.role_session = RoleSession(self.role, type(self)._holder)
        session.start()
        self.addCleanup(session.stop)  # type: ignore[attr-defined]
        self.addCleanup(session.finish)  # type: ignore[attr-defined]  # if setUp fails
        super().setUp()  # type: ignore[misc]
        # Registered after the suite's own cleanups, so it runs before them: the holder
        # lets go before the suite removes its files.
        self.addCleanup(session.finish)  # type: ignore[attr-defined]
