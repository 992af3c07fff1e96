"""Starting children (elastic/host/process.py): the parent-death signal, set in the forked
child without loading anything there, and a child whose parent is already gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from helpers import REPO, alive, child_env, wait_gone

# A threaded agent forks workers: the child must not load a library (ctypes.CDLL takes the
# loader's lock, which another thread may have held at the fork). Here loading one fails, so a
# child that tries gets no parent-death signal and outlives its parent.
SPAWN_THEN_WAIT = textwrap.dedent("""
    import ctypes, os, sys
    from elastic.host.process import spawn_worker

    def no_loading(*args, **kwargs):
        raise OSError("a library loaded in the forked child")

    ctypes.CDLL = no_loading
    worker = spawn_worker(["sleep", "1237"], os.environ)
    print(worker.pid, flush=True)
    sys.stdin.read()  # until the test kills us
""")


def test_a_worker_dies_with_its_parent_and_nothing_is_loaded_in_the_child():
    parent = subprocess.Popen([sys.executable, "-c", SPAWN_THEN_WAIT], env=child_env(), cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait()
        assert wait_gone({worker}, timeout=10) == set(), "the worker outlived its parent"
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


# A subreaper (us) forks P, which makes its hook and forks G, then exits at once; G waits for
# P to be gone and only then runs the hook P made: the parent-death signal would never come.
PARENT_GONE_FIRST = textwrap.dedent("""
    import ctypes, os
    from elastic.host.process import parent_death_hook

    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: the orphan G comes to us
    read_end, write_end = os.pipe()
    p = os.fork()
    if p == 0:
        hook = parent_death_hook()
        if os.fork() == 0:
            os.close(write_end)
            os.read(read_end, 1)  # end of file: P is gone
            hook()
            os._exit(0)  # the hook let it run on, orphaned
        os._exit(0)
    os.close(write_end)
    os.waitpid(p, 0)
    _, status = os.wait()  # G
    print(os.waitstatus_to_exitcode(status))
""")


def test_a_child_whose_parent_died_before_its_hook_ran_exits_at_once():
    out = subprocess.run([sys.executable, "-c", PARENT_GONE_FIRST], env=child_env(), cwd=REPO,
                         capture_output=True, text=True, check=False, timeout=30)
    assert out.stdout.strip() == "1", out.stderr
    assert "Traceback" not in out.stderr, out.stderr
