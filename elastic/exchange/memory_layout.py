"""Names inside a node's memory directory that the agent and the checkpoint memory tier share.

The memory tier (checkpoint/memory_tier.py) writes its checkpoints in `step_<N>/` directories
and REPLICATION_FILE (how many peers should hold a copy); the agent (elastic/launcher/
replica_pull.py) writes the copies of its peers' newest checkpoints under REPLICAS_DIR, one
directory per peer node, each laid out like a memory directory, which restore reads too.
"""

from __future__ import annotations

import re

REPLICAS_DIR = "replicas"  # <memory dir>/replicas/<peer node>/step_<N>/...
# {"replicas": k}, written by the memory tier's node leader as the workers place the tier:
# the agent also takes it as the sign that they use it (and starts its promotion process)
REPLICATION_FILE = "replication.json"
MANIFEST = "manifest.json"  # written last: a step directory with it is committed
STEP_DIR = re.compile(r"^step_(\d{12})$")


def peer_dir_name(node_id: str) -> str:
    """A peer node's replica directory name (node ids may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", node_id)
