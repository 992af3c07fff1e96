"""torchrun's --numa-binding: each worker runs on the CPUs near its GPU (local rank = GPU index).

Which CPUs those are is torch's own answer (torch.numa.binding, the code torchrun uses), asked
once at start-up: torch is imported then, and only then, as for --nproc-per-node auto. The
agent binds every thread of each worker it starts (a warm spare's threads exist already),
as torchrun binds every thread of its workers; threads started later inherit the binding.
"""

from __future__ import annotations

import os

from elastic.errors import ConfigError


def cpus_near_gpus(mode: str, nproc: int) -> tuple[frozenset[int], ...]:
    """The CPUs for each local rank, as torchrun's --numa-binding MODE picks them."""
    try:
        from torch.numa.binding import AffinityMode, NumaOptions, _get_logical_cpus_to_bind_to  # noqa: PLC0415
    except ImportError:
        raise ConfigError(f"--numa-binding {mode}: this torch has no torch.numa.binding (torchrun's "
                          "--numa-binding came with it); upgrade torch or drop --numa-binding") from None
    try:
        options = NumaOptions(affinity_mode=AffinityMode(mode))
        found = tuple(frozenset(_get_logical_cpus_to_bind_to(gpu_index=rank, numa_options=options))
                      for rank in range(nproc))
    except Exception as exc:  # noqa: BLE001  (torch's reasons vary: no CUDA, no NUMA in sysfs)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--numa-binding {mode}: cannot find the CPUs near GPUs 0..{nproc - 1}: {first} "
                          "(it needs a CUDA GPU per local rank; drop --numa-binding)") from None
    empty = [rank for rank, cpus in enumerate(found) if not cpus]
    if empty:
        raise ConfigError(f"--numa-binding {mode}: no CPU this node allows is near GPU {empty[0]}")
    return found


def bind_process(pid: int, cpus: frozenset[int]) -> None:
    """Bind every thread of process `pid` to `cpus`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass  # the thread ended meanwhile
