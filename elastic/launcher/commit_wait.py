"""A stopping worker group's checkpoint commit in flight: seen in the progress records, given
up to --commit-timeout after --grace (a multi-GB commit to object storage outlasts a short
grace), and named when SIGKILL cuts it off."""

from __future__ import annotations

import logging
import subprocess
import time

from elastic.launcher.hang_watch import ProgressWatch

log = logging.getLogger(__name__)


def commit_in_flight(progress: ProgressWatch) -> int | None:
    """The step whose checkpoint is being committed, as the ranks' progress records show it:
    the newest step a rank reported while no commit of it (or later) is recorded yet. None
    when the ranks report no steps (no TrainLoop) or the newest step is committed."""
    progress.read()
    steps = [s for s in progress.steps().values() if s is not None]
    committed = progress.committed()
    if not steps or (committed and committed[-1].step >= max(steps)):
        return None
    return max(steps)


def wait_for_commit(procs: list[subprocess.Popen], progress: ProgressWatch, timeout: float,
                    interval: float) -> int | None:
    """Workers still running with a commit in flight get up to `timeout` seconds more (the
    progress records are read every `interval`). Returns the step whose commit is still in
    flight at the end (SIGKILL will lose it), or None."""
    step = commit_in_flight(progress)
    if step is None or not any_running(procs):
        return None
    log.warning("elastic-run: the checkpoint of step %d is being committed: waiting up to %gs for it "
                "(--commit-timeout) before SIGKILL", step, timeout)
    deadline = time.monotonic() + timeout
    while any_running(procs) and time.monotonic() < deadline:
        step = commit_in_flight(progress)
        if step is None:
            wait_all(procs, deadline)  # committed: the workers exit now
            return None
        wait_all(procs, min(deadline, time.monotonic() + interval))
    return step if any_running(procs) else None


def wait_all(procs: list[subprocess.Popen], deadline: float) -> None:
    """Wait until every process exited or `deadline` (time.monotonic()) passed."""
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


def any_running(procs: list[subprocess.Popen]) -> bool:
    return any(p.poll() is None for p in procs)
