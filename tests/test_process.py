"""Child processes: they die with their parent, stop politely or by force, and keep a log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldfleet.common.process import ChildProcess, free_port, is_loopback, port_open, stop_process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone: it no longer runs
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_child_dies_when_its_parent_is_killed(tmp_path):
    # the parent starts a ChildProcess, prints the child's pid, then waits to be SIGKILLed (no cleanup)
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ldfleet.common.process import ChildProcess\n"
        f"c = ChildProcess([sys.executable, '-c', 'import time; time.sleep(120)'], {{}}, Path({str(tmp_path / 'c.log')!r})).start()\n"
        "print(c.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    code = "import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"
    child = ChildProcess([sys.executable, "-c", code], dict(os.environ), tmp_path / "logs" / "child.log").start()
    deadline = time.monotonic() + 10
    while "ready" not in child.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.running and "ready" in child.log_tail()
    proc = child.proc
    child.stop(timeout=0.5)
    assert not child.running and proc.returncode == -signal.SIGKILL


def test_stop_process_returns_the_exit_code_of_a_polite_child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    assert stop_process(proc, timeout=10) == -signal.SIGTERM


def test_ports_and_loopback():
    port = free_port()
    assert not port_open("127.0.0.1", port)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert port_open("127.0.0.1", port)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_a_spinning_process_counts_as_a_busy_core_and_takes_a_torch_thread():
    from ldfleet.simulations.simulate import busy_cores, torch_threads

    cores = os.cpu_count() or 1
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(0.5) >= 0.7
        assert torch_threads() <= max(1, cores - 0.5)  # never a thread for the core the spinner holds
        assert torch_threads(3) == 3  # an explicit request wins
    finally:
        stop_process(spinner, timeout=5)
