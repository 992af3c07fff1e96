"""Names inside a node's memory directory that the agent and the checkpoint memory tier share.

The memory tier (checkpoint/memory_tier.py) writes its checkpoints in `step_<N>/` directories
and REPLICATION_FILE (how many peers should hold a copy); the agent (elastic/launcher/
replica_pull.py) writes the copies of its peers' newest checkpoints under REPLICAS_DIR, one
directory per peer node, each laid out like a memory directory, which restore reads too.

The agents serve what each node holds (its own checkpoints and its copies) over HTTP to the
other agents and to the round's workers (elastic/launcher/replica_server.py): the agent
writes PEERS_FILE before its workers start, so that a restore can read the chunks its node
does not hold from the peers that do (checkpoint/io/peer_memory.py).
"""

from __future__ import annotations

import os
import re

REPLICAS_DIR = "replicas"  # <memory dir>/replicas/<peer node>/step_<N>/...
# {"replicas": k}, written by the memory tier's node leader as the workers place the tier:
# the agent also takes it as the sign that they use it (and starts its promotion process)
REPLICATION_FILE = "replication.json"
# The step the agent's promotion process is copying to durable storage (its number, as text):
# memory retention and the replica puller keep it meanwhile (the next round runs alongside)
PIN_FILE = ".promote-pin"
# {"token": the run's secret, "peers": {node id: "http://addr:port"}}: the round's other
# nodes and where their agents serve their memory; written (mode 0600, renamed into place) by
# the agent before its workers start each round
PEERS_FILE = ".peers.json"
MANIFEST = "manifest.json"  # written last: a step directory with it is committed
STEP_DIR = re.compile(r"^step_(\d{12})$")
# The agents' HTTP protocol: every request carries the run's secret in TOKEN_HEADER.
# GET HELD_PATH -> {"steps": {N: {file name: size}}}: the committed steps a node holds (own or copy);
# GET /step_<N>/<name> (optionally with a Range header) -> that file's bytes.
TOKEN_HEADER = "X-Elastic-Replica-Token"
HELD_PATH = "/held"
HTTP_TIMEOUT = 10.0  # seconds per connection and per read: a vanished peer must not hold a pull or a restore long


def replace_file(path: str, text: str) -> None:
    """`text` at `path`, readable by this user only (PEERS_FILE holds the run's secret), renamed
    into place whole: a reader never sees half of it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def peer_dir_name(node_id: str) -> str:
    """A peer node's replica directory name (node ids may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", node_id)


def pinned_step(directory: str) -> int | None:
    """The step pinned in the node's memory `directory` (PIN_FILE), if any."""
    try:
        with open(os.path.join(directory, PIN_FILE)) as f:
            return int(f.read())
    except (OSError, ValueError):  # none (the agent renames it into place whole)
        return None
