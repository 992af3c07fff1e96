"""Which rendezvous a command line asks for, decided as torchrun decides it.

    --standalone                                   a private etcd on loopback
    --rdzv-endpoint H:P (backend etcd, the default) an etcd (cluster) that is already there
    --rdzv-endpoint H:P --rdzv-backend c10d|static|etcd-v2
                                                   the agent whose host owns H starts an etcd on
                                                   P (as torchrun's c10d host starts its TCPStore);
                                                   it lives and dies with that node
    no endpoint, one node, no --master-port        a private etcd (torchrun: c10d on localhost:0)
    no endpoint otherwise (backend static/unset)   torchrun's static rendezvous: a fixed world
                                                   at --master-addr:--master-port, no etcd
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from elastic.errors import ConfigError
from elastic.launcher.torchrun_flags import StaticMaster

ETCD = ("etcd", "etcd-v3", "etcd_v3")
EMBEDDED = ("c10d", "static", "etcd-v2", "etcd_v2")  # etcd 3.6 has no v2 API: served by our etcd v3
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class RdzvChoice:
    endpoint: str | None  # None: a private etcd (standalone) unless `static`
    embedded: bool = False  # the endpoint's host starts the etcd
    static: StaticMaster | None = None
    note: str | None = None  # flags given that this choice does not use


def choose(ns: argparse.Namespace, min_nodes: int, max_nodes: int) -> RdzvChoice:
    backend = ns.rdzv_backend
    if backend is not None and backend not in ETCD + EMBEDDED:
        raise ConfigError(f"--rdzv-backend {backend!r} is not supported; use etcd (an etcd v3 cluster), "
                          "c10d or static")
    endpoint = ns.rdzv_endpoint or None
    static_flags = [f"--{name.replace('_', '-')}" for name in ("master_addr", "master_port", "node_rank")
                    if getattr(ns, name) is not None]
    if ns.standalone:
        if endpoint:
            raise ConfigError("--standalone starts its own etcd: drop --rdzv-endpoint (or --standalone)")
        if static_flags:
            raise ConfigError(f"--standalone and {static_flags[0]} contradict: --standalone runs one node "
                              f"with its own rendezvous; drop one of them")
        return RdzvChoice(None)
    if endpoint:
        note = (f"{', '.join(static_flags)} only apply to the static rendezvous (no --rdzv-endpoint): ignored"
                if static_flags else None)
        return RdzvChoice(endpoint, embedded=backend in EMBEDDED, note=note)
    if backend in ETCD + ("c10d", "etcd-v2", "etcd_v2") or (ns.master_port is None and max_nodes == 1):
        return RdzvChoice(None)  # one node: config.py says what to give for several
    return RdzvChoice(None, static=_static_master(ns, min_nodes, max_nodes))


def _static_master(ns: argparse.Namespace, min_nodes: int, max_nodes: int) -> StaticMaster:
    if min_nodes != max_nodes:
        raise ConfigError(f"--nnodes {min_nodes}:{max_nodes}: the static rendezvous (--master-addr/--master-port) "
                          "has a fixed size: give --nnodes N, or --rdzv-backend c10d --rdzv-endpoint HOST:PORT")
    try:
        port = int(ns.master_port) if ns.master_port is not None else DEFAULT_MASTER_PORT
        rank = int(ns.node_rank) if ns.node_rank is not None else 0
    except ValueError:
        raise ConfigError(f"--master-port {ns.master_port!r} and --node-rank {ns.node_rank!r} must be "
                          "whole numbers") from None
    if not 0 <= rank < max_nodes:
        raise ConfigError(f"--node-rank {rank} must be in 0..{max_nodes - 1} for --nnodes {max_nodes}")
    if not 0 < port < 65536:
        raise ConfigError(f"--master-port {port} must be in 1..65535")
    return StaticMaster(ns.master_addr or "127.0.0.1", port, rank)
