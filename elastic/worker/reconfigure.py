"""In-process reconfiguration: a stopped worker parks and joins the next round, same process.

Under `elastic-run --reconfigure` a TrainLoop over a plain DDP model with a checkpoint manager
declares itself reconfigurable in its progress record. On a planned membership change
(growth, a peer leaving) its agent writes a park request to the worker's control file
(elastic/exchange/control.py), which is one more vote in the stop agreement
(stop_agreement.py). Once all ranks stopped after step S and committed it, a rank without a
SIGTERM of its own parks: it says so in its progress record and polls the control file until
the agent hands it the next round's environment. It then leaves its process group, joins the
new one (elastic.worker.context.rejoin) and moves the model and the checkpoint manager to it
as if they had just been built there; the loop re-creates its own group, accumulation plan
and round fence and resumes from the checkpoint of S exactly as a fresh worker does.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.utils import _sync_module_states, _verify_param_shape_across_processes

from elastic.exchange import control
from elastic.exchange import env as names
from elastic.worker.accumulation import is_ddp
from elastic.worker.context import Context, rejoin, report_parked, report_reconfigurable
from elastic.worker.loop_state import Checkpointer
from elastic.worker.stop_agreement import PREEMPTED_EXIT_CODE, StopAgreement

log = logging.getLogger(__name__)

PARKED_POLL_SECONDS = 0.01  # how often a parked loop looks for its next round


class Reconfiguration:
    """How a stopped worker that can be reconfigured gets into the next round."""

    def __init__(self, control_file: str, model: torch.nn.Module, checkpoint: Checkpointer) -> None:
        self.control_file = control_file
        self._model = model
        self._checkpoint = checkpoint

    @classmethod
    def for_worker(cls, model: torch.nn.Module, checkpoint: Checkpointer | None) -> Reconfiguration | None:
        """This worker's, or None when it cannot be reconfigured in-process."""
        # Set when this worker can be reconfigured in-process: a plain DDP model (FSDP2's
        # sharding is bound to its mesh; comm hooks and mixed precision keep state of their
        # own), and a checkpoint to resume from exactly as the new ranks do.
        plain_ddp = is_ddp(model) and not model._comm_hooks and model.mixed_precision is None
        control_file = os.environ.get(names.CONTROL_FILE) if plain_ddp and checkpoint is not None else None
        return cls(control_file, model, checkpoint) if control_file else None

    def declare(self) -> None:
        """Tell the agent, through the progress record, that this worker can be reconfigured."""
        report_reconfigurable()

    def park(self, step: int, stop: StopAgreement, rank: int) -> Context:
        """Park with `step` committed until the agent sends the next round, then join that
        round's process group with the model and the checkpoint manager; SIGTERM while
        parked exits. The caller then re-creates the loop's own group, plan and fence."""
        report_parked(step)
        ctx = rejoin(self._wait_for_round(step, stop, rank))
        # The collectives and groups of the new ranks' scripts, in the same order: DDP's
        # construction, the CheckpointManager's group, the loop's (the caller's, next).
        _regroup_ddp(self._model)
        self._checkpoint.regroup()
        return ctx

    def _wait_for_round(self, step: int, stop: StopAgreement, rank: int) -> dict[str, str]:
        """The next round's environment, once the agent sends it; SIGTERM ends the wait."""
        while (env := control.read_assignment(self.control_file)) is None:
            if stop.sigterm:
                log.warning("rank %d: SIGTERM while parked at step %d; exiting", rank, step)
                raise SystemExit(PREEMPTED_EXIT_CODE)
            time.sleep(PARKED_POLL_SECONDS)
        return env


def _regroup_ddp(model: torch.nn.Module) -> None:
    """Move a DDP model to the new default group as if it had just been built there: the
    collectives its constructor makes in a new rank (default init_sync=True: a shape check, a
    broadcast of the module's state from rank 0, which the checkpoint load then overwrites)
    and a new reducer with the constructor's first-iteration buckets (the survivor's are laid
    out by its last round's gradient order; ranks with other layouts sum the wrong elements)."""
    group = dist.group.WORLD
    model.process_group = group
    parameters, expect_sparse_gradient = model._build_params_for_reducer()
    _verify_param_shape_across_processes(group, parameters)
    _sync_module_states(module=model.module, process_group=group, broadcast_bucket_size=model.broadcast_bucket_size,
                        src=0, params_and_buffers_to_ignore=model.parameters_to_ignore,
                        broadcast_buffers=model.forward_sync_buffers)
    static_graph, model.static_graph = model.static_graph, False
    model._ddp_init_helper(parameters, expect_sparse_gradient, model._build_debug_param_to_name_mapping(parameters),
                           static_graph)
    model._has_rebuilt_buckets = False
    if static_graph:
        model._set_static_graph()
    model._lazy_init_ran = False
