"""The per-worker control file: how the agent reconfigures a TrainLoop worker in-process.

On a planned membership change (growth, a peer leaving) the agent writes a park request to
each local worker's control file ($ELASTIC_CONTROL_FILE, one per local rank, the same for
every round). The TrainLoop sees it at its next SIGTERM agreement, saves and commits the
step all ranks agreed on, reports "parked at step S" in its progress record and polls the
file. Once the next round is sealed the agent replaces the request with the worker's new
environment (worker_env of the new round); the worker takes it, removes the file, re-forms
its process group and resumes from the checkpoint of step S. To let a parked worker go
instead, the agent sends SIGTERM as for any planned stop.

The file is replaced whole (write, then rename), so a reader sees one record or the other.
"""

from __future__ import annotations

import json
import os

def control_path(run_dir: str, local_rank: int) -> str:
    return os.path.join(run_dir, f"control-local{local_rank}")


def request_park(path: str) -> None:
    _replace(path, {"park": True})


def send_assignment(path: str, env: dict[str, str]) -> None:
    _replace(path, {"env": env})


def park_requested(path: str) -> bool:
    return os.path.exists(path)


def read_assignment(path: str) -> dict[str, str] | None:
    """The new environment once the agent sent it (the file is then removed), else None."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    env = record.get("env")
    if env is not None:
        os.unlink(path)
    return env


def clear(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _replace(path: str, record: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)
