"""The `partydbm` command line as processes of its own: what the interpreter adds
around `main()` (the console script, `python -m partydbm`'s exit codes, argv bytes, a
closed pipe), and the commands that live with signals: serve and demo.

Every process has a deadline and is killed and reaped in a `finally`.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import partydbm

from .cli_run import DEADLINE, PY, cli_process, contents, fails, fill, info_json
from .procs import Holder

pytestmark = pytest.mark.multiprocess


def test_console_script_is_installed_and_runs() -> None:
    script = Path(sys.executable).parent / "partydbm"
    assert script.exists(), f"no console script at {script}"
    r = subprocess.run([script, "--version"], capture_output=True, timeout=DEADLINE)
    assert r.returncode == 0 and r.stdout.decode().strip() == f"partydbm {partydbm.__version__}"


def test_python_dash_m_partydbm_passes_argv_bytes_and_exit_codes_through(
        tmp_path: Path) -> None:
    path = tmp_path / "db"
    r = cli_process("set", path, b"caf\xe9", b"\xff")  # argv that is not UTF-8
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert contents(path) == {b"caf\xe9": b"\xff"}
    r = cli_process("get", path, "caf\\xe9")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"\\xff\n", b"")
    for code, args, says in ((1, ["get", path, "missing"], "no such key: missing"),
                             (2, ["get", path], "required: KEY")):
        r = cli_process(*args)
        err = r.stderr.decode()
        assert r.returncode == code, (args, err)
        assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err


def test_keys_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    fill(tmp_path / "db", {b"%06d" % i: b"" for i in range(20000)})
    r = subprocess.run(f"{sys.executable} -m partydbm keys db | head -1", shell=True,
                       capture_output=True, timeout=DEADLINE, cwd=tmp_path)
    assert r.stdout == b"000000\n" and r.stderr == b""


# -- serve ---------------------------------------------------------------------------------------
class Serve:
    """A `partydbm serve` process whose stderr log is read line by line, with deadlines."""

    def __init__(self, path: Path, *opts: str) -> None:
        self.proc = subprocess.Popen([*PY, "serve", str(path), *opts],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log: list[str] = []

    def expect(self, pattern: str, timeout: float = 30) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log:
                if re.search(pattern, line):
                    return line
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                line = self.proc.stderr.readline().decode()
                if not line:
                    break
                self.log.append(line)
        raise AssertionError(f"serve never logged {pattern!r}; log: {self.log}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(DEADLINE)
        assert self.proc.stderr is not None
        self.log += self.proc.stderr.read().decode().splitlines(keepends=True)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextlib.contextmanager
def _serving_one_follower(path: Path) -> Iterator[tuple[Serve, Holder]]:
    """A verbose `partydbm serve` leading `path`, and a follower it logged connecting;
    the serve process is killed at the end whatever happened."""
    serve = Serve(path, "--verbose")
    try:
        serve.expect(r"leading .* on .*partydbm\.sock")
        with Holder() as follower:
            assert follower.open(path) == "follower"
            serve.expect(rf"follower pid {follower.pid} connected \(1 connected\)")
            yield serve, follower
    finally:
        serve.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_leads_until_signalled_and_a_follower_carries_on(tmp_path: Path,
                                                               sig: int) -> None:
    path = tmp_path / "db"
    with _serving_one_follower(path) as (serve, follower):
        with Holder() as passing:
            assert passing.open(path) == "follower"
            serve.expect(rf"follower pid {passing.pid} connected \(2 connected\)")
        serve.expect(rf"follower pid {passing.pid} left \(1 connected\)")
        follower.put(path, b"before", b"1")
        assert serve.stop(sig) == 0
        assert any("closed" in line for line in serve.log), serve.log
        follower.put(path, b"after", b"2")  # it took over
        assert info_json(path)["leader_pid"] == follower.pid
        assert contents(path) == {b"before": b"1", b"after": b"2"}


def _niceness_of_threads(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            out.append(int(f.read().rsplit(")", 1)[1].split()[16]))  # field 19: nice
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="threads have their own niceness on Linux")
def test_serve_does_not_lower_its_serving_threads(tmp_path: Path) -> None:
    # A process that only serves has nothing of its own to give way to (a library
    # leader's serving threads run at SERVE_NICENESS: test_multiprocess).
    path = tmp_path / "db"
    with _serving_one_follower(path) as (serve, follower):
        follower.put(path, b"k", b"v")
        nice = _niceness_of_threads(serve.proc.pid)
        assert len(nice) >= 3 and set(nice) == {os.getpriority(os.PRIO_PROCESS, 0)}, nice


def test_serve_follows_and_takes_over_when_the_leader_dies(tmp_path: Path) -> None:
    path = tmp_path / "db"
    leader = Holder()
    serve: Serve | None = None
    try:
        assert leader.open(path) == "leader"
        serve = Serve(path)
        serve.expect(rf"led by pid {leader.pid}: following")
        leader.kill()
        serve.expect(r"leading ")
        facts = info_json(path)
        assert (facts["role"], facts["leader_pid"]) == ("follower", serve.proc.pid)
        assert serve.stop() == 0
    finally:
        if serve is not None:
            serve.kill()
        leader.close()


# -- demo ------------------------------------------------------------------------------------------
@pytest.mark.heavy  # five processes, the leader SIGKILLed three times in 4 s
def test_demo_short_passes_and_leaves_nothing_behind() -> None:
    r = cli_process("demo", "--short", timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, (out, r.stderr)
    assert out.rstrip().endswith("PASS")
    assert "leader SIGKILLed 3 times" in out
    assert "0 out of order, duplicated or with a gap" in out
    where = re.search(r"reader on (\S+);", out)
    assert where and not os.path.exists(os.path.dirname(where.group(1))), "temp dir left"
    for pid in {int(p) for p in re.findall(r"pid (\d+)", out)}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.heavy
def test_demo_stops_every_process_it_started_on_SIGTERM() -> None:
    proc = subprocess.Popen([*PY, "demo", "--short"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = b""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + DEADLINE
        while b"SIGKILL the leader" not in out:  # mid-run, once the first leader is gone
            assert time.monotonic() < deadline and proc.poll() is None, out
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                out += os.read(proc.stdout.fileno(), 65536)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE)
    text = out.decode()
    where = re.search(r"reader on (\S+);", text)
    assert where and not os.path.exists(os.path.dirname(where.group(1))), "temp dir left"
    pids = {int(p) for p in re.findall(r"pid (\d+)", text)}
    assert len(pids) >= 5  # the host, three writers and the reader, at least
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_demo_refuses_a_database_with_data_or_in_use(tmp_path: Path, holder: Holder) -> None:
    fill(tmp_path / "db", {b"k": b"v"})
    fails(1, "demo", tmp_path / "db", "--short", says="not empty")
    assert holder.open(tmp_path / "busy") == "leader"
    try:
        fails(1, "demo", tmp_path / "busy", "--short", says=f"open in process {holder.pid}")
    finally:
        holder.close_db(tmp_path / "busy")
    assert contents(tmp_path / "db") == {b"k": b"v"}
