"""Workers run through elastic.worker_main exactly as `python SCRIPT` would run them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import child_env


def boot(tmp_path, body: str, *args: str, module: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "user_script.py"
    script.write_text(body)
    target = ["-m", "user_script"] if module else [str(script)]
    return subprocess.run([sys.executable, "-m", "elastic.worker_main", *target, *args], cwd=tmp_path,
                          env=child_env(), capture_output=True, text=True, timeout=60)


def test_script_sees_its_argv_name_and_path(tmp_path):
    body = "import sys, os\nprint(__name__, sys.argv[1:], os.path.basename(sys.path[0]) == os.path.basename(os.path.dirname(__file__)))\n"
    result = boot(tmp_path, body, "--lr", "0.1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "__main__ ['--lr', '0.1'] True"


def test_module_mode(tmp_path):
    result = boot(tmp_path, "import sys\nprint(__name__, sys.argv[1:])\n", "x", module=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "__main__ ['x']"


@pytest.mark.parametrize(("body", "code", "stderr"), [
    ("import sys\nsys.exit(3)\n", 3, ""),
    ("import sys\nsys.exit('bad config')\n", 1, "bad config"),
    ("raise ValueError('boom')\n", 1, "ValueError: boom"),
    ("pass\n", 0, ""),
])
def test_exit_status_and_traceback_as_python_gives_them(tmp_path, body, code, stderr):
    result = boot(tmp_path, body)
    assert result.returncode == code
    assert stderr in result.stderr
    if "ValueError" in stderr:
        assert "Traceback (most recent call last)" in result.stderr


def test_atexit_handlers_and_non_daemon_threads_finish(tmp_path):
    body = (
        "import atexit, threading, time\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done', flush=True))).start()\n"
    )
    result = boot(tmp_path, body)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["thread done", "atexit ran"]
