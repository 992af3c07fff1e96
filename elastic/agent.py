"""The per-node agent: rendezvous, start workers, watch them, restart the group on failure.

One loop, one round at a time:

    join round r -> start workers -> watch until: all workers succeeded  -> done
                                                  a local worker failed -> bump round (spends a restart)
                                                  a member node is gone -> bump round (spends a restart)
                                                  the round moved on    -> stop workers, join again
                                                  the job was closed    -> stop workers, exit
                                                  we were signalled     -> stop workers (they save), exit

After a failure the workers are killed at once: nothing the survivors do can complete
without the failed rank, and the last committed checkpoint is where everyone resumes.
A planned stop (signal, round moved for a newcomer) sends SIGTERM first so that workers can
save, and SIGKILL after `--grace`.
"""

from __future__ import annotations

import enum
import logging
import signal
import tempfile
from dataclasses import dataclass

from elastic.errors import RendezvousClosedError
from elastic.events import EventLog, RunResult
from elastic.launch_config import LaunchConfig
from elastic.rendezvous import EtcdRendezvous
from elastic.workers import Assignment, WorkerExit, WorkerGroup

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """The supervisor received SIGTERM or SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROUND_CHANGED = "round changed"
    CLOSED = "closed"


@dataclass(frozen=True)
class _Watched:
    outcome: _Outcome
    exits: list[WorkerExit]
    detail: str = ""


class Agent:
    def __init__(self, config: LaunchConfig, rendezvous: EtcdRendezvous, events: EventLog,
                 rdzv_endpoint: str) -> None:
        self._config = config
        self._rdzv = rendezvous
        self._events = events
        self._endpoint = rdzv_endpoint
        self._run_dir = tempfile.mkdtemp(prefix=f"elastic-{config.run_id}-")
        self._result = RunResult(ok=False, reason="not started")

    def run(self) -> RunResult:
        """Run the job on this node until it succeeds, fails or is interrupted."""
        self._rdzv.start()
        try:
            return self._run_rounds()
        except RendezvousClosedError as exc:
            return self._finish(ok=False, reason=f"job closed by another node: {exc}", code=1)
        finally:
            self._rdzv.shutdown()

    def _run_rounds(self) -> RunResult:
        while True:
            assignment = self._rdzv.join()
            self._result.rounds += 1
            self._result.restarts = assignment.restart_count
            self._events.emit("round_sealed", round=assignment.round, world_size=assignment.world_size,
                              group_rank=assignment.group_rank, restarts=assignment.restart_count)
            group = WorkerGroup(self._config, assignment, self._run_dir, self._endpoint)
            group.start()
            self._events.emit("workers_started", round=assignment.round, pids=group.pids)
            try:
                watched = self._watch(group, assignment)
            except Interrupted as exc:
                exits = group.stop(self._config.grace)
                self._result.exits = exits
                self._events.emit("interrupted", signal=str(exc), round=assignment.round)
                self._rdzv.close(ok=False, reason=f"elastic-run on node stopped by {exc}")
                return self._finish(ok=False, reason=f"stopped by {exc}", code=128 + exc.signum)
            result = self._after_round(group, assignment, watched)
            if result is not None:
                return result

    def _after_round(self, group: WorkerGroup, assignment: Assignment,
                     watched: _Watched) -> RunResult | None:
        """Decide what the end of a round means; None means: join the next round."""
        round_ = assignment.round
        if watched.outcome is _Outcome.SUCCEEDED:
            group.wait_output()
            self._result.exits = watched.exits
            self._rdzv.mark_done(round_)
            self._events.emit("succeeded", round=round_)
            return self._finish(ok=True, reason="all workers exited 0", code=0)
        if watched.outcome is _Outcome.CLOSED:
            self._result.exits = group.stop(self._config.grace)
            return self._finish(ok=False, reason=f"job closed: {watched.detail}", code=1)
        if watched.outcome is _Outcome.ROUND_CHANGED:
            self._result.exits = group.stop(self._config.grace)
            self._events.emit("round_left", round=round_, reason=watched.detail)
            return None
        # A local failure: stop the rest at once and spend one restart of the job's budget.
        exits = group.stop(0)
        failed = next((e for e in watched.exits if not e.ok), None)
        reason = f"rank {failed.rank} {failed.describe()}" if failed else watched.detail
        if failed is not None:
            self._result.failures.append((round_, failed))
        self._result.exits = exits
        self._events.emit("failure", round=round_, reason=reason,
                          rank=failed.rank if failed else None,
                          returncode=failed.returncode if failed else None)
        self._rdzv.bump_round(round_, reason=reason, failure=True)
        restarts = self._rdzv.restart_count()
        if restarts > self._config.max_restarts:
            final = f"{reason}; restarts exhausted ({self._config.max_restarts} allowed)"
            self._rdzv.close(ok=False, reason=final)
            self._result.restarts = self._config.max_restarts
            return self._finish(ok=False, reason=final, code=1)
        self._events.emit("restart", round=round_, restarts=restarts, reason=reason)
        log.warning("elastic-run: %s; restarting the group (restart %d of %d)", reason, restarts,
                    self._config.max_restarts)
        return None

    def _watch(self, group: WorkerGroup, assignment: Assignment) -> _Watched:
        """Watch local workers every --monitor-interval and the job's keys by etcd watch."""
        sealed_members = self._rdzv.sealed_members(assignment.round)
        while True:
            exits = group.poll()
            if exits is not None:
                outcome = _Outcome.SUCCEEDED if all(e.ok for e in exits) else _Outcome.FAILED
                return _Watched(outcome, exits)
            if not self._rdzv.wait_for_change(self._config.monitor_interval):
                continue
            closed = self._rdzv.closed()
            if closed is not None:
                return _Watched(_Outcome.CLOSED, [], closed["reason"])
            if self._rdzv.current_round() != assignment.round:
                return _Watched(_Outcome.ROUND_CHANGED, [], "the job moved to a new round")
            gone = self._rdzv.departed_members(assignment.round, sealed_members)
            if gone:
                return _Watched(_Outcome.FAILED, [], f"node {gone[0]} left without finishing")

    def _finish(self, *, ok: bool, reason: str, code: int) -> RunResult:
        self._result.ok, self._result.reason, self._result.exit_code = ok, reason, code
        self._events.emit("job_end", ok=ok, reason=reason, exit_code=code)
        return self._result
