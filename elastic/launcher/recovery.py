"""What a node does once a round ended in failure: kill its workers, name the failed rank and
the node to blame, bump the round (spending a restart), then restart (backing off in a crash
loop) or stop the job (a deterministic failure, the budget spent). A worker that survives
SIGKILL makes the node leave the job instead (see give_up_node)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from elastic.exchange.error_record import ErrorRecord
from elastic.launcher.config import LaunchConfig
from elastic.launcher.events import EventLog, RunResult
from elastic.launcher.failure_rules import FailureHistory, deterministic_reason, failure_signature
from elastic.launcher.round_watch import Watched
from elastic.launcher.run_record import RunRecord
from elastic.launcher.worker_group import WorkerExit, WorkerGroup
from elastic.rendezvous.handler import EtcdRendezvous

log = logging.getLogger(__name__)


# Seconds a round of a script that reports no progress must run before failing for its restart
# not to count as a crash loop (imports, process group and the first step take less).
NO_PROGRESS_CRASH_LOOP = 10.0


class Recovery:
    def __init__(self, config: LaunchConfig, rendezvous: EtcdRendezvous, events: EventLog,
                 record: RunRecord, raise_if_signalled: Callable[[], None]) -> None:
        self._config = config
        self._rdzv = rendezvous
        self._events = events
        self._record = record
        self._raise_if_signalled = raise_if_signalled
        self._history = FailureHistory(limit=config.same_failure_limit)

    def after_failure(self, group: WorkerGroup, round_: int, watched: Watched) -> RunResult | None:
        """Kill the workers at once (nothing the survivors do can complete without the failed
        rank), report the failure and bump the round; then stop the job, or None: restart."""
        exits = group.stop(0)
        if group.unkillable:
            self._record.result.exits = exits
            return self.give_up_node(group, round_)
        failed, recorded = group.first_failure(watched.exits, exits) if watched.exits else (None, None)
        watched = self._name_failure(group, round_, watched, failed, recorded)
        self._record.result.exits = exits
        self._events.emit("failure", round=round_, reason=watched.detail, node=watched.failed_node,
                          rank=failed.rank if failed else None,
                          returncode=failed.returncode if failed else None)
        self._rdzv.bump_round(round_, reason=watched.detail, failed_node=watched.failed_node)
        return self._restart_or_stop(group, round_, watched, failed, recorded)

    def give_up_node(self, group: WorkerGroup, round_: int) -> RunResult:
        """A worker stuck in the kernel (D state) ignores SIGKILL and may hold what a new
        worker needs (memory, a GPU): this node leaves the job as a failed node, so that the
        others go on without it."""
        reason = (f"workers survived SIGKILL for {self._config.unkillable_timeout:g}s: {group.describe_unkillable()}; "
                  f"node {self._rdzv.node_id} leaves the job (the others go on): drain or reboot it")
        self._rdzv.bump_round(round_, reason=reason, failed_node=self._rdzv.node_id)
        self._events.emit("node_bad", round=round_, pids=group.unkillable, reason=reason)
        return self._record.finish(ok=False, reason=reason, code=1)

    def _name_failure(self, group: WorkerGroup, round_: int, watched: Watched, failed: WorkerExit | None,
                      recorded: ErrorRecord | None) -> Watched:
        """The failure as reported: the rank that failed first, with what it raised or how it
        died, and the node to blame."""
        if failed is not None:
            error = recorded.message if recorded else None
            detail = f"rank {failed.rank} raised {error}" if error else f"rank {failed.rank} {failed.describe()}"
            watched = dataclasses.replace(watched, detail=detail, step=group.progress.steps().get(failed.rank))
            self._record.result.failures.append((round_, failed))
        if watched.failed_node == self._rdzv.node_id:  # a local failure: was it ours, or a peer's?
            blamed = self._rdzv.blame(round_, recorded.time if recorded else watched.at)
            watched = dataclasses.replace(watched, failed_node=blamed)
        return watched

    def _restart_or_stop(self, group: WorkerGroup, round_: int, watched: Watched, failed: WorkerExit | None,
                         recorded: ErrorRecord | None) -> RunResult | None:
        restarts = self._rdzv.restart_count()
        signature = failure_signature(recorded, watched.detail, watched.step, self._record.newest_commit)
        killed = failed is not None and recorded is None and failed.returncode < 0
        if self._history.repeated(signature, killed=killed):
            # Failed the same way again without getting past where the last attempt resumed:
            # a bug or a broken environment, not a fault. Retrying would only burn the budget.
            final = deterministic_reason(watched.detail, watched.step, recorded, self._config.checkpoint_dir,
                                         self._history.limit)
            self._rdzv.close(ok=False, reason=final)
            return self._record.finish(ok=False, reason=final, code=1)
        if restarts > self._config.max_restarts:
            final = (f"{watched.detail}; the restart budget stopped the job: restarts exhausted "
                     f"({self._config.max_restarts} allowed)")
            self._rdzv.close(ok=False, reason=final)
            self._record.result.restarts = self._config.max_restarts
            return self._record.finish(ok=False, reason=final, code=1)
        self._events.emit("restart", round=round_, restarts=restarts, reason=watched.detail)
        log.warning("elastic-run: %s; restarting (restart %d of %d)", watched.detail, restarts,
                    self._config.max_restarts)
        self._back_off(self._history.back_off(_progressed(group)))
        return None

    def _back_off(self, delay: float) -> None:
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            self._raise_if_signalled()
            self._rdzv.wait_for_change(left)


def _progressed(group: WorkerGroup) -> bool:
    """Whether the round got anywhere before it failed (else a restart is a crash loop, and backs
    off): a step completed, as the ranks report; for a script that reports no progress (no
    TrainLoop, no elastic.init()), a round that ran NO_PROGRESS_CRASH_LOOP seconds, longer than
    a start-up crash takes."""
    if group.progress.reporting():
        return group.progress.first_step_done()
    return time.monotonic() - group.started >= NO_PROGRESS_CRASH_LOOP
