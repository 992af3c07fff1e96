"""Workers run through elastic.launcher.bootstrap exactly as `python SCRIPT` would run them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elastic.launcher.warm_pool import WarmPool
from helpers import child_env


@pytest.fixture(params=["cold", "warm"])
def start(request, tmp_path, monkeypatch):
    """How elastic-run starts a Python worker: a fresh interpreter given the script, or a warm
    spare (elastic/launcher/warm_pool.py) that imported torch first and is handed the script after."""
    if request.param == "cold":
        def cold(argv: list[str]) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "elastic.launcher.bootstrap", *argv], cwd=tmp_path,
                                    env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return cold
    monkeypatch.chdir(tmp_path)  # the spare takes on the agent's working directory
    pool = WarmPool(1, child_env())
    request.addfinalizer(pool.close)

    return lambda argv: pool.launch(argv, child_env())


def boot(tmp_path, start, body: str, *args: str, module: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "user_script.py"
    script.write_text(body)
    target = ["-m", "user_script"] if module else [str(script)]
    proc = start([*target, *args])
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def test_script_sees_its_argv_name_and_path(tmp_path, start):
    body = "import sys, os\nprint(__name__, sys.argv[1:], os.path.basename(sys.path[0]) == os.path.basename(os.path.dirname(__file__)))\n"
    result = boot(tmp_path, start, body, "--lr", "0.1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "__main__ ['--lr', '0.1'] True"


def test_module_mode(tmp_path, start):
    result = boot(tmp_path, start, "import sys\nprint(__name__, sys.argv[1:])\n", "x", module=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "__main__ ['x']"


@pytest.mark.parametrize(("body", "code", "stderr"), [
    ("import sys\nsys.exit(3)\n", 3, ""),
    ("import sys\nsys.exit('bad config')\n", 1, "bad config"),
    ("raise ValueError('boom')\n", 1, "ValueError: boom"),
    ("pass\n", 0, ""),
])
def test_exit_status_and_traceback_as_python_gives_them(tmp_path, start, body, code, stderr):
    result = boot(tmp_path, start, body)
    assert result.returncode == code
    assert stderr in result.stderr
    if "ValueError" in stderr:
        assert "Traceback (most recent call last)" in result.stderr


def test_atexit_handlers_and_non_daemon_threads_finish(tmp_path, start):
    body = (
        "import atexit, threading, time\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done', flush=True))).start()\n"
    )
    result = boot(tmp_path, start, body)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["thread done", "atexit ran"]


def test_warm_spare_runs_the_script_with_the_assigned_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pool = WarmPool(1, child_env(OMP_NUM_THREADS="3"))
    try:
        pool.fill()
        spare = pool.pids[0]
        (tmp_path / "s.py").write_text(
            "import os, sys\nprint(os.getpid(), os.environ['RANK'], os.environ['OMP_NUM_THREADS'],"
            " 'torch' in sys.modules)\n")
        proc = pool.launch(["s.py"], child_env(OMP_NUM_THREADS="3", RANK="5"))
        out, err = proc.communicate(timeout=60)
    finally:
        pool.close()
    assert proc.returncode == 0, err
    # The spare itself ran the script, with torch imported before and the rank's variables set.
    assert out.decode().split() == [str(spare), "5", "3", "True"]


@pytest.mark.parametrize("assignment", [b'{"argv": ["x"]}', b""])
def test_a_spare_keeps_what_arrived_before_its_agent_reset_the_connection(assignment):
    """The agent closes its end with the spare's "ready" byte unread, after sending the
    assignment (or without one: it closed the pool, or died): the connection is reset. The
    spare's reader keeps what arrived (the assignment, or nothing: it then exits 0) and raises
    nothing (no traceback on the console)."""
    import socket
    import struct

    from elastic.launcher.bootstrap import _read_all

    agent, spare = socket.socketpair()
    spare.sendall(b"1")  # ready, never read by the agent
    agent.sendall(assignment)
    agent.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    agent.close()  # with unread data: a reset
    message = bytearray()
    _read_all(spare, message)
    spare.close()
    assert message == assignment
