"""The per-node agent: rendezvous, start workers, watch them, restart the group on failure.

One loop, one round at a time:

    join round r -> start workers -> watch until: all workers succeeded   -> done
                                                  a local worker failed  -> bump round (spends a restart)
                                                  a member node is gone  -> bump round (spends a restart)
                                                  nodes wait to join     -> bump round (growth, free)
                                                  the round moved on     -> stop workers, join again
                                                  our lease expired      -> kill workers, new lease, join again
                                                  the job was closed     -> stop workers, exit
                                                  we were signalled      -> leave (peers go on) or stop the job

After a failure the workers are killed at once: nothing the survivors do can complete
without the failed rank, and the last committed checkpoint is where everyone resumes.
A planned stop (signal, growth, a peer leaving) sends SIGTERM first so that workers can
save the step they are on, and SIGKILL after `--grace`. On growth or a peer leaving, workers
that declared they can (a DDP TrainLoop) are not stopped: they park after a step they agree
on, and the next round hands them their new ranks (elastic/control.py); anything else, or
any trouble on the way, falls back to the stop and a fresh start.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
import re
import signal
import tempfile
import time
from dataclasses import dataclass

from elastic.exchange.error_record import ErrorRecord
from elastic.errors import RendezvousClosedError
from elastic.launcher.events import EventLog, RunResult
from elastic.launcher.config import LaunchConfig
from elastic.rendezvous.handler import EtcdRendezvous
from elastic.launcher.goodput import summarize
from elastic.launcher.warm_pool import WarmPool
from elastic.launcher.worker_group import WorkerExit, WorkerGroup, common_env
from elastic.rendezvous.protocol import Assignment

log = logging.getLogger(__name__)

# Spares are started once the round's first step is done (their imports would slow the
# round's start), or this long after the round started, for workers that report no steps.
REFILL_DELAY = 10.0
PARK_POLL = 0.02  # seconds between looks at whether the workers have parked


class Interrupted(Exception):
    """The supervisor received SIGTERM or SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROUND_CHANGED = "round changed"
    LEASE_LOST = "lease lost"
    CLOSED = "closed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class _Watched:
    outcome: _Outcome
    exits: list[WorkerExit]
    detail: str = ""
    failed_node: str | None = None
    step: int | None = None  # the failed rank's last completed step, if it reports progress
    at: float = dataclasses.field(default_factory=time.time)  # when we saw it (wall clock)


class Agent:
    def __init__(self, config: LaunchConfig, rendezvous: EtcdRendezvous, events: EventLog,
                 rdzv_endpoint: str) -> None:
        self._config = config
        self._rdzv = rendezvous
        self._events = events
        self._endpoint = rdzv_endpoint
        self._run_dir = tempfile.mkdtemp(prefix=f"elastic-{config.run_id}-")
        self._result = RunResult(ok=False, reason="not started")
        self._signal: int | None = None
        self._last_failure: tuple | None = None  # _failure_signature of the last failure
        self._progress_step: int | None = None
        self._progress_at = 0.0
        self._commits_logged: set[int] = set()  # steps of the checkpoint commits in the events log
        self._stalled_failures = 0  # failures in a row of rounds that completed no step
        self._parked: WorkerGroup | None = None  # workers waiting in-process for the next round
        self._pool = (WarmPool(config.nproc_per_node, common_env(config, rdzv_endpoint, rendezvous.node_id))
                      if config.warm_pool and not config.no_python else None)
        rendezvous.should_abort = self._raise_if_signalled

    def request_stop(self, signum: int) -> None:
        """From a signal handler: stop at the next check (never raises inside I/O)."""
        if self._signal is None:
            self._signal = signum
        self._rdzv.wake()

    def _raise_if_signalled(self) -> None:
        if self._signal is not None:
            raise Interrupted(self._signal)

    def run(self) -> RunResult:
        """Run the job on this node until it succeeds, fails, or is stopped."""
        try:
            if self._pool is not None:
                self._pool.fill()  # the first round's workers import torch during the rendezvous
            self._rdzv.start()
            return self._run_rounds()
        except RendezvousClosedError as exc:
            if exc.ok:  # a spare the job never needed
                return self._finish(ok=True, reason=f"not needed: {exc}", code=0)
            return self._finish(ok=False, reason=f"job closed: {exc}", code=1)
        except Interrupted as exc:
            self._events.emit("interrupted", signal=str(exc))
            return self._finish(ok=False, reason=f"stopped by {exc} before the workers started",
                                code=128 + exc.signum)
        finally:
            if self._pool is not None:
                self._pool.close()
            self._rdzv.shutdown()

    def _run_rounds(self) -> RunResult:
        while True:
            assignment = self._join()
            self._result.rounds += 1
            self._result.restarts = assignment.restart_count
            self._events.emit("round_sealed", round=assignment.round, world_size=assignment.world_size,
                              group_rank=assignment.group_rank, restarts=assignment.restart_count)
            group = WorkerGroup(self._config, assignment, self._run_dir, self._endpoint, self._rdzv.node_id)
            self._progress_step = None
            if self._parked is None:
                group.start(self._pool)
                self._events.emit("workers_started", round=assignment.round, pids=group.pids)
            else:
                group.adopt(self._parked)
                self._parked = None
                self._events.emit("workers_reconfigured", round=assignment.round, pids=group.pids)
            watched = self._watch(group, assignment)
            group.progress.read()
            self._record_progress(group, assignment.round, force=True)
            self._record_commit(group, assignment.round)
            result = self._after_round(group, assignment, watched)
            if result is None and group.unkillable:  # stopped for a change made elsewhere
                result = self._give_up_node(group, assignment.round)
            if result is not None:
                return result

    def _join(self) -> Assignment:
        """Join the next round; parked workers are stopped if that fails (no round to hand them)."""
        try:
            return self._rdzv.join()
        except BaseException:
            if self._parked is not None:
                self._parked.stop(self._config.grace)
                self._parked = None
            raise

    def _watch(self, group: WorkerGroup, assignment: Assignment) -> _Watched:
        """Check local workers every --monitor-interval; learn of the job's changes by watch."""
        members = self._rdzv.sealed_members(assignment.round)
        started = time.monotonic()
        while True:
            if self._signal is not None:
                return _Watched(_Outcome.INTERRUPTED, [], signal.Signals(self._signal).name)
            exits = group.poll()
            if exits is not None:
                if all(e.ok for e in exits):
                    return _Watched(_Outcome.SUCCEEDED, exits)
                # Which rank failed first is decided after the group is stopped (see
                # _restart_after_failure): a rank that raised may still be cleaning up.
                return _Watched(_Outcome.FAILED, exits, failed_node=self._rdzv.node_id, at=group.all_alive_at)
            group.progress.read()  # one read per check: hung() and _record_progress() use it
            hangs = group.progress.hung()
            if hangs:
                # A rank stuck in a collective looks the same from outside as the rank that
                # stopped it, so every quiet rank's stacks go into its log before the kill.
                for hang in hangs:
                    group.dump_stacks(hang.rank)
                ranks = ",".join(str(h.rank) for h in hangs)
                return _Watched(_Outcome.FAILED, [], f"rank {ranks} hung: {hangs[0].reason}",
                                failed_node=self._rdzv.node_id, step=group.progress.steps().get(hangs[0].rank))
            if self._rdzv.lease_lost:
                return _Watched(_Outcome.LEASE_LOST, [], "this node's lease expired")
            closed = self._rdzv.closed()
            if closed is not None:
                return _Watched(_Outcome.CLOSED, [], closed["reason"])
            if self._rdzv.current_round() != assignment.round:
                return _Watched(_Outcome.ROUND_CHANGED, [], "the job moved to a new round")
            gone = self._rdzv.departed_members(assignment.round, members)
            if gone:
                return _Watched(_Outcome.FAILED, [], f"node {gone[0]} is gone", failed_node=gone[0])
            if self._rdzv.should_grow(assignment.round):
                self._rdzv.bump_round(assignment.round, reason="nodes are waiting to join")
                self._events.emit("growing", round=assignment.round)
                return _Watched(_Outcome.ROUND_CHANGED, [], "growing: nodes are waiting to join")
            self._record_progress(group, assignment.round)
            self._record_commit(group, assignment.round)
            self._tend_pool(group, started)
            pending = self._rdzv.debounce_left()
            timeout = self._config.monitor_interval if pending is None else min(pending, self._config.monitor_interval)
            self._rdzv.wait_for_change(timeout)

    def _after_round(self, group: WorkerGroup, assignment: Assignment,
                     watched: _Watched) -> RunResult | None:
        """Act on how a round ended; None means: join the next round."""
        round_ = assignment.round
        outcome = watched.outcome
        if outcome is _Outcome.SUCCEEDED:
            group.wait_output()
            self._result.exits = watched.exits
            self._rdzv.mark_done(round_)
            self._events.emit("succeeded", round=round_)
            return self._finish(ok=True, reason="all workers exited 0", code=0)
        if outcome is _Outcome.INTERRUPTED:
            return self._stop_on_signal(group, assignment)
        if outcome is _Outcome.CLOSED:
            self._result.exits = group.stop(self._config.grace)
            return self._finish(ok=False, reason=f"job closed: {watched.detail}", code=1)
        if outcome is _Outcome.ROUND_CHANGED:
            # A failure elsewhere: our workers are stuck in collectives with a dead peer, so
            # kill them now. A planned change: SIGTERM first so that they save their step.
            failure = self._rdzv.ended_by_failure(round_)
            if not failure and self._park(group, round_):
                self._parked = group
            else:
                self._result.exits = group.stop(0 if failure else self._config.grace)
            self._events.emit("round_left", round=round_, reason=watched.detail)
            return None
        if outcome is _Outcome.LEASE_LOST:
            self._result.exits = group.stop(0)  # peers have gone on without us: nothing to save
            self._events.emit("lease_lost", round=round_)
            self._rdzv.renew()
            return None
        return self._restart_after_failure(group, assignment, watched)

    def _park(self, group: WorkerGroup, round_: int) -> bool:
        """A planned change: ask workers that can be reconfigured in-process to park after a
        step they agree on and commit; whether all did within --grace (else: stop them)."""
        if not self._config.reconfigure or not group.progress.reconfigurable():
            return False
        group.request_park()
        deadline = time.monotonic() + self._config.grace
        while group.running and self._signal is None and time.monotonic() < deadline:
            group.progress.read()
            if group.progress.parked():
                self._record_progress(group, round_, force=True)
                self._record_commit(group, round_)
                return True
            time.sleep(min(self._config.monitor_interval, PARK_POLL))
        log.warning("elastic-run: workers did not all park within --grace %gs; stopping them", self._config.grace)
        return False

    def _restart_after_failure(self, group: WorkerGroup, assignment: Assignment,
                               watched: _Watched) -> RunResult | None:
        round_ = assignment.round
        exits = group.stop(0)
        if group.unkillable:
            self._result.exits = exits
            return self._give_up_node(group, round_)
        failed, recorded = group.first_failure(watched.exits, exits) if watched.exits else (None, None)
        error = recorded.message if recorded else None
        if failed is not None:
            detail = f"rank {failed.rank} raised {error}" if error else f"rank {failed.rank} {failed.describe()}"
            watched = dataclasses.replace(watched, detail=detail, step=group.progress.steps().get(failed.rank))
            self._result.failures.append((round_, failed))
        if watched.failed_node == self._rdzv.node_id:  # a local failure: was it ours, or a peer's?
            blamed = self._rdzv.blame(round_, recorded.time if recorded else watched.at)
            watched = dataclasses.replace(watched, failed_node=blamed)
        self._result.exits = exits
        self._events.emit("failure", round=round_, reason=watched.detail, node=watched.failed_node,
                          rank=failed.rank if failed else None,
                          returncode=failed.returncode if failed else None)
        self._rdzv.bump_round(round_, reason=watched.detail, failed_node=watched.failed_node)
        restarts = self._rdzv.restart_count()
        signature = _failure_signature(recorded, watched.detail, watched.step,
                                       max(self._commits_logged, default=None))
        # Only an exception or a hang can repeat deterministically; a rank killed by a signal
        # (SIGKILL from outside, the OOM killer, a lost node) says nothing about the code.
        killed = failed is not None and error is None and failed.returncode < 0
        if signature is not None and not killed and signature == self._last_failure:
            # Failed the same way again without getting past where the last attempt resumed:
            # a bug or a broken environment, not a fault. Retrying would only burn the budget.
            final = _deterministic_reason(watched.detail, watched.step, recorded, self._config.checkpoint_dir)
            self._rdzv.close(ok=False, reason=final)
            return self._finish(ok=False, reason=final, code=1)
        self._last_failure = signature
        if restarts > self._config.max_restarts:
            final = f"{watched.detail}; restarts exhausted ({self._config.max_restarts} allowed)"
            self._rdzv.close(ok=False, reason=final)
            self._result.restarts = self._config.max_restarts
            return self._finish(ok=False, reason=final, code=1)
        self._events.emit("restart", round=round_, restarts=restarts, reason=watched.detail)
        log.warning("elastic-run: %s; restarting (restart %d of %d)", watched.detail, restarts,
                    self._config.max_restarts)
        # Back off only in a crash loop: a round that completed a step since it resumed
        # proves the restart worked, so the next fault is again restarted at once.
        self._stalled_failures = 1 if group.progress.first_step_done() else self._stalled_failures + 1
        self._back_off(self._stalled_failures)
        return None

    def _give_up_node(self, group: WorkerGroup, round_: int) -> RunResult:
        """A worker stuck in the kernel (D state) ignores SIGKILL and may hold what a new
        worker needs (memory, a GPU): this node leaves the job as a failed node, so that the
        others go on without it."""
        reason = (f"workers survived SIGKILL for {self._config.unkillable_timeout:g}s: {group.describe_unkillable()}; "
                  f"node {self._rdzv.node_id} leaves the job (the others go on): drain or reboot it")
        self._rdzv.bump_round(round_, reason=reason, failed_node=self._rdzv.node_id)
        self._events.emit("node_bad", round=round_, pids=group.unkillable, reason=reason)
        return self._finish(ok=False, reason=reason, code=1)

    def _back_off(self, failures: int) -> None:
        """After `failures` failed rounds in a row that completed no step: the first restart
        is immediate; repeated ones wait 0.5, 1, 2 ... up to 30 s."""
        delay = 0.0 if failures <= 1 else min(30.0, 0.5 * 2 ** (failures - 2))
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            self._raise_if_signalled()
            self._rdzv.wait_for_change(left)

    def _stop_on_signal(self, group: WorkerGroup, assignment: Assignment) -> RunResult:
        """SIGTERM/SIGINT: leave if the others can go on without us, else stop the whole job.

        Either way the workers get SIGTERM first, so a TrainLoop saves the step it is on.
        """
        name = signal.Signals(self._signal).name
        others = assignment.num_nodes - 1
        if others >= self._config.min_nodes:
            self._rdzv.leave(assignment.round)
            self._result.exits = group.stop(self._config.grace)
            self._events.emit("left", round=assignment.round, signal=name)
            return self._finish(ok=True, reason=f"left the job on {name}; {others} nodes go on", code=0)
        self._rdzv.close(ok=False, reason=f"preempted: node {self._rdzv.node_id} got {name}")
        self._result.exits = group.stop(self._config.grace)
        self._events.emit("interrupted", round=assignment.round, signal=name)
        return self._finish(ok=False, reason=f"stopped by {name}", code=128 + self._signal)

    def _finish(self, *, ok: bool, reason: str, code: int) -> RunResult:
        self._result.ok, self._result.reason, self._result.exit_code = ok, reason, code
        self._events.emit("job_end", ok=ok, reason=reason, exit_code=code)
        self._result.goodput = summarize(self._events.records)
        return self._result

    def _tend_pool(self, group: WorkerGroup, started: float) -> None:
        """Start the next spares once the round is under way (see REFILL_DELAY); log when
        they are ready."""
        if self._pool is None:
            return
        if not self._pool.full and (group.progress.first_step_done() or time.monotonic() - started >= REFILL_DELAY):
            self._pool.fill()
            self._events.emit("spares_started", pids=self._pool.pids)
        if self._pool.newly_ready():
            self._events.emit("spares_ready", pids=self._pool.pids)

    def _record_commit(self, group: WorkerGroup, round_: int) -> None:
        """Put the checkpoint commits that every local rank has seen into the events log."""
        for commit in group.progress.committed():
            if commit.step not in self._commits_logged:
                self._commits_logged.add(commit.step)
                self._events.emit("checkpoint_committed", at=commit.at, round=round_, step=commit.step,
                                  stall=round(commit.stall, 4))

    def _record_progress(self, group: WorkerGroup, round_: int, force: bool = False) -> None:
        """Put the local ranks' slowest completed step into the events log (at most 2/s,
        unless `force`d at the end of a round)."""
        slowest = group.progress.slowest()
        now = time.monotonic()
        if slowest is None or slowest.step == self._progress_step:
            return
        if not force and self._progress_step is not None and now - self._progress_at < 0.5:
            return
        self._progress_step, self._progress_at = slowest.step, now
        # Stamped with when the step completed (the file's mtime), not when we looked.
        self._events.emit("progress", at=slowest.changed_at, round=round_, step=slowest.step)


# Random tokens that differ between two runs of the same bug: temp/shard file suffixes,
# uuids, addresses (e.g. "rank00001-3f9c2a1b7d4e.safetensors", "0x7f3a9c...").
_VOLATILE = re.compile(r"\b(?:0x)?[0-9a-f]{8,}\b")


def _failure_signature(error: ErrorRecord | None, detail: str, step: int | None,
                       committed: int | None) -> tuple | None:
    """What must be equal for two failures in a row to count as one deterministic failure;
    None when this one cannot be judged (no step reported, no error from the system).

    - An error from the operating system (an errno in the exception's chain: a full disk,
      a missing file, permissions) is the same error whatever file, rank or step hit it
      first: the same type and errno, while the job made no progress in between (the
      newest committed checkpoint, `committed`, where a restart resumes, is the same).
    - Any other error, or a hang (`detail`): the same message with random tokens blanked,
      and without the rank (whichever rank raised first), at the same step.
    """
    if error is not None and error.errno is not None:
        return ("os error", error.type, error.errno, committed)
    if step is None:
        return None
    return ("message", _VOLATILE.sub("#", error.message if error is not None else detail), step)


def _deterministic_reason(detail: str, step: int | None, error: ErrorRecord | None,
                          checkpoint_dir: str | None) -> str:
    """Why the job stops at a failure that repeated (see _failure_signature), and what to do."""
    if error is None or error.errno is None:
        return f"{detail} again at step {step}; not retrying a deterministic failure"
    code = errno.errorcode.get(error.errno, str(error.errno))
    again = f"{detail} again, with no newer checkpoint to resume from"
    if error.errno != errno.ENOSPC:
        return f"{again} ({code}: {os.strerror(error.errno)}); not retrying a deterministic failure"
    if checkpoint_dir and error.filename and _inside(error.filename, checkpoint_dir):
        return (f"{again}: the checkpoint directory's filesystem is full (ENOSPC); not retrying a "
                f"deterministic failure: free space or point --checkpoint-dir elsewhere")
    where = f"the filesystem of {error.filename}" if error.filename else "a filesystem"
    return f"{again}: {where} is full (ENOSPC); not retrying a deterministic failure: free space there"


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)
