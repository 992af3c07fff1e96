"""torchrun's command line, flag for flag: every flag of `torchrun --help` (torch 2.13) is
accepted in dash and underscore spellings and as a PET_<NAME> variable.

Flags with a meaning here are given it (docs/CLI.md has the table); a flag that has none is
accepted and said once on stderr, so a torchrun launch line runs with one word changed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass

from elastic.errors import ConfigError

# torchrun's default; Slurm adds SIGUSR1/SIGUSR2 to warn of a time limit.
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
NUMA_MODES = ("node", "socket", "exclusive", "core-complex")

# flag -> (the value that means "not given", what elastic-run does not do with it)
IGNORED = {
    "start_method": ("spawn", ("--start-method: workers always start as new processes (like spawn); python "
                               "workers may be warm spares that imported torch already (--no-warm-pool to avoid)")),
    "event_log_handler": ("null", ("--event-log-handler: torchrun's event handlers are not loaded; events go "
                                   "to LOG_DIR/events.jsonl (--log-dir)")),
    "logs_specs": (None, "--logs-specs: torchrun.logs_specs plugins are not loaded; per-rank logs go under --log-dir"),
    "duplicate_stdout_filters": ("", ("--duplicate-stdout-filters: matching lines are not copied to a separate "
                                      "file; grep the per-rank logs under --log-dir")),
    "duplicate_stderr_filters": ("", ("--duplicate-stderr-filters: matching lines are not copied to a separate "
                                      "file; grep the per-rank logs under --log-dir")),
}


def add_flag(parser: argparse.ArgumentParser, name: str, *extra: str, **kwargs) -> None:
    """Add --name and --name_with_underscores, defaulting to $PET_NAME like torchrun."""
    dest = name.replace("-", "_")
    spellings = [f"--{name}"] + ([f"--{dest}"] if "-" in name else []) + list(extra)
    env = os.environ.get(f"PET_{dest.upper()}")
    if env is not None:
        if kwargs.get("action") in ("store_true", argparse.BooleanOptionalAction):
            kwargs["default"] = env.lower() in ("1", "true", "yes")
        else:
            kwargs["default"] = env
    parser.add_argument(*spellings, dest=dest, **kwargs)


def add_torchrun_flags(p: argparse.ArgumentParser) -> None:
    """torchrun's flags that the elastic flags in cli.py do not already cover."""
    add_flag(p, "node-rank", default=None, help="static rendezvous: this node's rank (0..N-1)")
    add_flag(p, "master-addr", default=None, help="static rendezvous: address of node rank 0 "
             "(default 127.0.0.1); no etcd is used")
    add_flag(p, "master-port", default=None, help="static rendezvous: port of node rank 0 (default 29500)")
    add_flag(p, "role", default="default", help="role name given to the workers (ROLE_NAME)")
    add_flag(p, "run-path", action="store_true", help="run the script with Python, as torchrun's "
             "runpy.run_path does (takes precedence over --no-python)")
    add_flag(p, "shutdown-timeout", default=None, help="torchrun's name for --grace (also "
             "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT)")
    add_flag(p, "signals-to-handle", default=DEFAULT_SIGNALS, help="signals that stop the job as SIGTERM "
             f"does: the workers get SIGTERM, save, SIGKILL after --grace (default {DEFAULT_SIGNALS})")
    add_flag(p, "numa-binding", default=None, help=f"one of {', '.join(NUMA_MODES)}: bind each worker to "
             "the CPUs near its GPU (local rank = GPU index)")
    add_flag(p, "virtual-local-rank", action="store_true", help="LOCAL_RANK=0 in every worker and "
             "CUDA_VISIBLE_DEVICES set to its own GPU")
    add_flag(p, "start-method", default="spawn", help="accepted; workers always start as new processes")
    add_flag(p, "event-log-handler", default="null", help="accepted; events go to LOG_DIR/events.jsonl")
    add_flag(p, "logs-specs", default=None, help="accepted; per-rank logs go under --log-dir")
    add_flag(p, "duplicate-stdout-filters", default="", help="accepted; not applied")
    add_flag(p, "duplicate-stderr-filters", default="", help="accepted; not applied")


def say_ignored(ns: argparse.Namespace, *more: str | None) -> None:
    """One stderr line per torchrun flag given that has no effect here (and `more` notes)."""
    notes = [note for dest, (unset, note) in IGNORED.items() if getattr(ns, dest) not in (unset, None)]
    for note in [*notes, *filter(None, more)]:
        print(f"elastic-run: note: {note}", file=sys.stderr)


def parse_signals(text: str) -> tuple[signal.Signals, ...]:
    """'SIGTERM,SIGUSR1' -> the signals; a name Python does not know is a ConfigError."""
    found = []
    for name in filter(None, (item.strip() for item in text.split(","))):
        try:
            found.append(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        except KeyError:
            raise ConfigError(f"--signals-to-handle: {name!r} is not a signal name (e.g. SIGTERM,SIGUSR1)") from None
    if signal.SIGKILL in found or signal.SIGSTOP in found:
        raise ConfigError("--signals-to-handle: SIGKILL and SIGSTOP cannot be handled")
    return tuple(found)


def grace_seconds(grace: str | None, shutdown_timeout: str | None) -> str:
    """--grace and torchrun's --shutdown-timeout name one setting: at most one may be given."""
    if grace is not None and shutdown_timeout is not None:
        raise ConfigError(f"--grace {grace} and --shutdown-timeout {shutdown_timeout} set the same "
                          "grace period: give one")
    return grace or shutdown_timeout or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or "5"


def numa_mode(text: str | None) -> str | None:
    if text is not None and text not in NUMA_MODES:
        raise ConfigError(f"--numa-binding {text!r} must be one of {', '.join(NUMA_MODES)}")
    return text


@dataclass(frozen=True)
class StaticMaster:
    """A fixed world, torchrun's static rendezvous: no etcd, node rank R of N."""

    addr: str
    port: int
    node_rank: int


def virtual_local_rank_env(local_rank: int) -> dict[str, str]:
    """torchrun's --virtual-local-rank: each worker sees only its own GPU, as device 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",")] if visible is not None else None
    if gpus is not None and local_rank >= len(gpus):
        raise ConfigError(f"--virtual-local-rank: local rank {local_rank} has no GPU in "
                          f"CUDA_VISIBLE_DEVICES={visible}")
    return {"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": gpus[local_rank] if gpus is not None else str(local_rank)}
