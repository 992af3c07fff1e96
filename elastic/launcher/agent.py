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
on, and the next round hands them their new ranks (elastic/exchange/control.py); anything else, or
any trouble on the way, falls back to the stop and a fresh start.

What ends a round: round_watch.py; after a failure: recovery.py (its rules: failure_rules.py);
after a planned change: planned_change.py; the warm spares' refill: pool_refill.py; the
events log and the summary: run_record.py.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time

from elastic.errors import RendezvousClosedError
from elastic.exchange import env as names
from elastic.launcher.config import LaunchConfig
from elastic.launcher.events import EventLog, RunResult
from elastic.launcher.memory_dir import MemoryDir
from elastic.launcher.planned_change import PlannedChange
from elastic.launcher.pool_refill import tend_pool
from elastic.launcher.recovery import Recovery
from elastic.launcher.round_watch import Outcome, Watched, check_round
from elastic.launcher.run_record import RunRecord
from elastic.launcher.status_publisher import StatusPublisher
from elastic.launcher.warm_pool import WarmPool
from elastic.launcher.worker_group import WorkerGroup, common_env, password_path
from elastic.rendezvous.handler import EtcdRendezvous
from elastic.rendezvous.protocol import Assignment

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """The supervisor received SIGTERM or SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Agent:
    def __init__(self, config: LaunchConfig, rendezvous: EtcdRendezvous, events: EventLog,
                 rdzv_endpoint: str) -> None:
        self._config = config
        self._rdzv = rendezvous
        self._events = events
        self._endpoint = rdzv_endpoint
        self._run_dir = tempfile.mkdtemp(prefix=f"elastic-{config.run_id}-")  # mode 0700; removed by run()
        if config.rdzv.password is not None:
            names.write_password_file(password_path(self._run_dir), config.rdzv.password)
        self._memory = MemoryDir(config, rendezvous.node_id, events)  # the checkpoint memory tier; removed by run()
        self._group: WorkerGroup | None = None  # the round's workers, once started
        self._signal: int | None = None
        self._record = RunRecord(events)
        self._recovery = Recovery(config, rendezvous, events, self._record, self._raise_if_signalled)
        self._change = PlannedChange(config, self._record, lambda: self._signal is not None)
        self._pool = (WarmPool(config.nproc_per_node, common_env(config, rdzv_endpoint, rendezvous.node_id, self._run_dir))
                      if config.warm_pool and not config.no_python else None)
        rendezvous.should_abort = self._raise_if_signalled
        self._status = StatusPublisher(config, rendezvous, events)  # status key, metrics, stragglers

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
            if isinstance(self._rdzv, EtcdRendezvous):  # a static world has no registration to advertise the port in
                self._rdzv.replica_port = self._memory.serve(self._rdzv.addr, self._rdzv.replica_token)
            return self._run_rounds()
        except RendezvousClosedError as exc:
            if exc.ok:  # a spare the job never needed
                return self._record.finish(ok=True, reason=f"not needed: {exc}", code=0)
            return self._record.finish(ok=False, reason=f"job closed: {exc}", code=1)
        except Interrupted as exc:
            self._events.emit("interrupted", signal=str(exc))
            return self._record.finish(ok=False, reason=f"stopped by {exc} before the workers started",
                                       code=128 + exc.signum)
        finally:
            if self._group is not None and not self._group.ended:  # an error escaped while they ran
                self._group.stop(0)
            if self._pool is not None:
                self._pool.close()
            self._status.close()
            self._rdzv.shutdown()
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._memory.remove()

    def _run_rounds(self) -> RunResult:
        while True:
            assignment = self._join()
            self._record.round_sealed(assignment)
            ring = self._rdzv.sealed_members(assignment.round)
            self._memory.follow(ring, self._rdzv.replica_endpoints(assignment.round, ring))
            group = WorkerGroup(self._config, assignment, self._run_dir, self._endpoint, self._rdzv.node_id)
            self._group = group
            self._start_workers(group, assignment.round)
            watched = self._watch(group, assignment.round)
            group.progress.read()
            self._record.progress(group.progress, assignment.round, force=True)
            result = self._after_round(group, assignment, watched)
            if result is None and group.unkillable:  # stopped for a change made elsewhere
                result = self._recovery.give_up_node(group, assignment.round)
            if result is not None:
                return result

    def _join(self) -> Assignment:
        """Join the next round; parked workers are stopped if that fails (no round to hand them)."""
        try:
            return self._rdzv.join()
        except BaseException:
            self._change.stop_parked()
            raise

    def _start_workers(self, group: WorkerGroup, round_: int) -> None:
        """Hand the round to the workers parked in the last one, else start new ones."""
        if self._change.hand_over(group):
            self._events.emit("workers_reconfigured", round=round_, pids=group.pids)
        else:
            group.start(self._pool)
            self._events.emit("workers_started", round=round_, pids=group.pids)

    def _watch(self, group: WorkerGroup, round_: int) -> Watched:
        """Check local workers every --monitor-interval; learn of the job's changes by watch."""
        members = self._rdzv.sealed_members(round_)
        started = time.monotonic()
        while True:
            if self._signal is not None:
                return Watched(Outcome.INTERRUPTED, [], signal.Signals(self._signal).name)
            watched = check_round(group, round_, members, self._rdzv, self._events)
            if watched is not None:
                return watched
            self._record.progress(group.progress, round_)
            self._status.tick(group)
            self._memory.prepare(group.progress, started)
            if self._pool is not None:
                tend_pool(self._pool, group.progress, started, self._events)
            pending = self._rdzv.debounce_left()
            timeout = self._config.monitor_interval if pending is None else min(pending, self._config.monitor_interval)
            self._rdzv.wait_for_change(timeout)

    def _after_round(self, group: WorkerGroup, assignment: Assignment, watched: Watched) -> RunResult | None:
        """Act on how a round ended; None means: join the next round."""
        round_ = assignment.round
        outcome = watched.outcome
        if outcome is Outcome.SUCCEEDED:
            group.wait_output()
            self._record.result.exits = watched.exits
            self._rdzv.mark_done(round_)
            self._events.emit("succeeded", round=round_)
            return self._record.finish(ok=True, reason="all workers exited 0", code=0)
        if outcome is Outcome.INTERRUPTED:
            return self._stop_on_signal(group, assignment)
        if outcome is Outcome.CLOSED:
            self._stop_saving(group, round_)
            return self._record.finish(ok=False, reason=f"job closed: {watched.detail}" + self._lost(group), code=1)
        if outcome is Outcome.ROUND_CHANGED:
            failure = self._rdzv.ended_by_failure(round_)
            self._change.leave(group, round_, failure=failure)
            self._events.emit("round_left", round=round_, reason=watched.detail)
            if failure:  # a peer failed: this node's shards of the memory checkpoint are needed too
                self._memory.save_at_breakpoint(round_)
            return None
        if outcome is Outcome.LEASE_LOST:
            self._record.result.exits = group.stop(0)  # peers have gone on without us: nothing to save
            self._events.emit("lease_lost", round=round_)
            self._rdzv.renew()
            return None
        result = self._recovery.after_failure(group, round_, watched)
        self._memory.save_at_breakpoint(round_)  # workers are gone; it runs alongside the next round
        return result

    def _stop_on_signal(self, group: WorkerGroup, assignment: Assignment) -> RunResult:
        """SIGTERM/SIGINT: leave if the others can go on without us, else stop the whole job.

        Either way the workers get SIGTERM first, so a TrainLoop saves the step it is on.
        """
        name = signal.Signals(self._signal).name
        log.warning("elastic-run: %s: the workers save the step they are on: SIGKILL after --grace %gs, or after "
                    "up to --commit-timeout %gs more while a checkpoint commit is in flight",
                    name, self._config.grace, self._config.commit_timeout)
        others = assignment.num_nodes - 1
        if others >= self._config.min_nodes:
            self._rdzv.leave(assignment.round)
            self._stop_saving(group, assignment.round)
            self._events.emit("left", round=assignment.round, signal=name)
            return self._record.finish(ok=True, reason=f"left the job on {name}; {others} nodes go on"
                                       + self._lost(group), code=0)
        self._rdzv.close(ok=False, reason=f"preempted: node {self._rdzv.node_id} got {name}")
        self._stop_saving(group, assignment.round)
        self._events.emit("interrupted", round=assignment.round, signal=name)
        return self._record.finish(ok=False, reason=f"stopped by {name}" + self._lost(group), code=128 + self._signal)

    def _stop_saving(self, group: WorkerGroup, round_: int) -> None:
        """Stop the workers, letting them save (--grace, --commit-timeout); log the commits."""
        self._record.result.exits = group.stop(self._config.grace)
        group.progress.read()
        self._record.progress(group.progress, round_, force=True)

    def _lost(self, group: WorkerGroup) -> str:
        """What SIGKILL cut off, for the summary ("" when nothing was)."""
        if group.lost_commit is None:
            return ""
        newest = self._record.newest_commit
        resume = f"step {newest}" if newest is not None else "the start (no checkpoint committed)"
        return (f"; the checkpoint of step {group.lost_commit} was still being committed after --commit-timeout "
                f"{self._config.commit_timeout:g}s and is lost (SIGKILL): the job resumes from {resume}")
