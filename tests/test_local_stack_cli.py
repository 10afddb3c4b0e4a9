"""``docpipe up`` and ``docpipe down``: the local stack as processes, and every one of them gone
when it is stopped, by ``down`` (SIGTERM), by a closed terminal (SIGHUP), or by a SIGTERM that
comes again while it stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.devstack import wait_until


def _children(pid: int) -> set[int]:
    """Every live process whose parent is ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal_masks(pid: int) -> str:
    """The signals ``pid`` blocks, ignores and catches: why a signal it was sent did nothing."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "(no /proc status)"
    return " ".join(line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def _as_from_a_terminal() -> None:
    """Start ``up`` with the signal dispositions a terminal gives it, whatever this test run inherited.

    A run started in the background (``nohup make test &``) hands every process it starts SIGHUP,
    SIGINT and SIGQUIT ignored, and ``up`` rightly keeps an ignored SIGHUP ignored (that is what
    nohup asks for): the hangup case then waited 60 s for nothing (seen as SigIgn 0x1001007)."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("stop", ["down", "hangup", "terminated_twice"])
def test_up_prints_every_url_and_everything_it_started_stops_with_it(tmp_path, stop):
    env = {**os.environ, "HOME": str(tmp_path)}
    up = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "up", "--workers", "1", "--providers", "baidu"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_as_from_a_terminal,
    )
    # Drained as it comes: a pipe nobody reads fills at 64 kB and blocks the writer (and with it `up`).
    lines: list[str] = []
    drain = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)
    drain.start()
    state = tmp_path / ".docpipe" / "up.json"
    started: list[int] = []
    try:
        wait_until(lambda: state.exists() or up.poll() is not None, 120, "docpipe up")
        assert up.poll() is None, "".join(lines)
        started = _children(up.pid)
        assert len(started) >= 6  # redis, moto, the S3 front, the emulator, the receiver, a worker, Flower
        env_file = Path(json.loads(state.read_text())["workdir"]) / "docpipe.env"
        assert "DOCPIPE_REDIS_URL" in env_file.read_text() and oct(env_file.stat().st_mode & 0o777) == "0o600"
        if stop == "down":
            down = subprocess.run([sys.executable, "-m", "pipeline.cli", "down"], env=env, capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, down.stdout + down.stderr
        elif stop == "hangup":
            up.send_signal(signal.SIGHUP)
        else:  # a supervisor that signals again while `up` is stopping what it started
            up.send_signal(signal.SIGTERM)
            wait_until(lambda: not all(_alive(pid) for pid in started), 30, "the first process of the stack stopped")
            up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.send_signal(signal.SIGUSR1)  # `up` dumps every thread's stack on SIGUSR1
            wait_until(lambda: "Thread 0x" in "".join(lines) or "Current thread" in "".join(lines), 10, "a stack dump")
            raise AssertionError(f"`up` still runs 60 s after {stop}; {_signal_masks(up.pid)}\n" + "".join(lines)) from None
        drain.join(10)
        output = "".join(lines)
    finally:
        if up.poll() is None:  # the test failed with `up` running: stop it and what it started, or they outlive the run
            up.terminate()
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                for pid in started:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    for name in ("Redis", "S3", "baidu", "callbacks", "Flower", "password"):
        assert name in output
    wait_until(lambda: not any(_alive(pid) for pid in started), 30, "every process of the stack stopped")
    assert not state.exists()


def test_service_ports_are_reserved_across_processes_and_kept_off_the_ephemeral_range():
    """Two stacks starting side by side (xdist workers) never draw the same port, and no outgoing
    connection can take one between its draw and the service's bind: a callback receiver that lost
    its port so exited, and its readiness check was answered by another stack's S3."""
    from pipeline.devstack import _ephemeral_range, free_port

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pipeline.devstack import free_port\n"
         "print(*[free_port() for _ in range(50)], flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        theirs = {int(p) for p in holder.stdout.readline().split()}  # held until its stdin closes
        ours = {free_port() for _ in range(50)}
    finally:
        holder.communicate("", timeout=30)
    assert len(theirs) == len(ours) == 50
    assert not theirs & ours
    assert max(theirs | ours) < _ephemeral_range()[0]
