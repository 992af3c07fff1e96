"""`elastic-run`: torchrun-compatible launcher with an etcd rendezvous. Also `python -m elastic`.

Flags take torchrun's names, with dashes or underscores, and default to PET_<NAME> variables
as torchrun's do. Bad input ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
import uuid

from elastic.host.net import free_port, outgoing_addr
from elastic.launcher.agent import Agent
from elastic.errors import ConfigError, ElasticError, RendezvousError
from elastic.rendezvous.etcd_client import EtcdConfig, connect
from elastic.rendezvous.etcd_server import EtcdServer
from elastic.launcher.events import EventLog
from elastic.rendezvous.settings import RendezvousSettings
from elastic.launcher.config import (LaunchConfig, parse_hang, parse_nnodes, parse_nproc,
                                   parse_std)
from elastic.rendezvous.etcd_state import EtcdBackend
from elastic.launcher import goodput
from elastic.launcher import status_cli
from elastic.launcher.live_flags import add_live_flags, live_options
from elastic.rendezvous.handler import EtcdRendezvous
from elastic.launcher import rdzv_choice
from elastic.launcher.embedded_etcd import EmbeddedEtcd, connect_when_up
from elastic.launcher.node_slot import NodeSlot
from elastic.launcher.numa_binding import cpus_near_gpus
from elastic.launcher.static_rendezvous import StaticRendezvous
from elastic.launcher.torchrun_flags import (add_flag as _flag, add_torchrun_flags, grace_seconds, numa_mode,
                                             parse_signals, say_ignored)

PROG = "elastic-run"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + traceback-like noise
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run a PyTorch training script on elastic, fault-tolerant "
                "workers (torchrun-compatible flags).")
    _flag(p, "nnodes", default="1", help="N or MIN:MAX nodes (default 1)")
    _flag(p, "nproc-per-node", default="1", help="workers per node: N, auto, cpu, gpu or xpu")
    _flag(p, "rdzv-backend", default=None, help="etcd (default: an etcd v3 at --rdzv-endpoint), or "
          "c10d|static|etcd-v2 (this project's etcd, served by the endpoint's host); without an endpoint "
          "and with --master-port or several nodes: torchrun's static rendezvous")
    _flag(p, "rdzv-endpoint", default="", help="HOST:PORT of etcd; empty: a private etcd (standalone)")
    _flag(p, "rdzv-id", default=None, help="job id scoping every rendezvous key")
    _flag(p, "rdzv-conf", default="", help="k=v,... e.g. join_timeout=600,last_call_timeout=2,"
          "lease_ttl=5,outage_timeout=60,probe_timeout=2,key_prefix=elastic,world_size_multiple=1,ca_cert=,cert=,"
          "key=,user=,password_file= (or $ELASTIC_RDZV_PASSWORD)")
    _flag(p, "standalone", action="store_true", help="single node with a private etcd on loopback")
    _flag(p, "max-restarts", default="0", help="job-wide restarts after failures (default 0)")
    _flag(p, "monitor-interval", default="0.1", help="seconds between worker checks (default 0.1)")
    _flag(p, "grace", default=None, help="seconds between SIGTERM and SIGKILL when stopping workers (default 5)")
    _flag(p, "commit-timeout", default="300", help="after --grace, seconds more for workers whose "
          "checkpoint commit is in flight before SIGKILL (default 300)")
    _flag(p, "unkillable-timeout", default="30", help="seconds a SIGKILLed worker may take to die; past "
          "that (D state) this node leaves the job as bad and the others go on (default 30)")
    _flag(p, "checkpoint-dir", default=None, help="checkpoint URL given to workers (ELASTIC_CHECKPOINT_DIR)")
    _flag(p, "log-dir", default=None, help="directory for per-rank logs and the events log")
    _flag(p, "redirects", "-r", default="0", help="keep worker streams off the console, in log files "
          "only: 1 stdout, 2 stderr, 3 both, or LOCAL_RANK:BITS,...")
    _flag(p, "tee", "-t", default="0", help="accepted for torchrun compatibility: with a log dir, "
          "streams always go to the log files too")
    _flag(p, "local-ranks-filter", default="", help="show only these local ranks on the console, e.g. 0 or 0,1")
    _flag(p, "hang-timeout", default="300", help="a rank that reports steps (TrainLoop) and makes none for "
          "this long is hung: its stacks are dumped and the group restarted (0 disables); auto[:F[:MIN]]: "
          "F (10) x its slowest step in this round, at least MIN (30) s, at most 300 s")
    _flag(p, "first-step-timeout", default="600", help="like --hang-timeout, for the first step of a round")
    _flag(p, "warm-pool", action=argparse.BooleanOptionalAction, default=True,
          help="keep --nproc-per-node spare Python workers that have already imported torch, so "
          "that a restart skips the imports (default on; --no-warm-pool starts workers cold)")
    _flag(p, "reconfigure", action=argparse.BooleanOptionalAction, default=False,
          help="on growth or a graceful leave, keep the TrainLoop workers that stay and re-form "
          "their process group in-process; the script must make no collectives before the loop "
          "besides DDP's construction (default off: they restart)")
    _flag(p, "same-failure-limit", default="3", help="stop the job after this many identical failures "
          "in a row (same error, no progress between; transient errors never count); 0 disables (default 3)")
    add_live_flags(p, _flag)  # --metrics-port, --straggler-factor, --exclude-stragglers, --straggler-window
    _flag(p, "node-id", default=None, help="stable id of this node (default: host name, plus -slotK for "
          "the K-th agent of the job on this host)")
    _flag(p, "local-addr", default=None, help="address peers reach this node at")
    _flag(p, "module", "-m", action="store_true", help="run the entry point as a module (python -m)")
    _flag(p, "no-python", action="store_true", help="run the entry point as a program, not with python")
    add_torchrun_flags(p)
    p.add_argument("entrypoint", help="training script (or module with -m, program with --no-python)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return p


def config_from_args(ns: argparse.Namespace) -> LaunchConfig:
    min_nodes, max_nodes = parse_nnodes(ns.nnodes)
    choice = rdzv_choice.choose(ns, min_nodes, max_nodes)
    endpoint = choice.endpoint
    if ns.standalone:
        min_nodes = max_nodes = 1
    try:
        grace = float(grace_seconds(ns.grace, ns.shutdown_timeout))
        max_restarts, monitor = int(ns.max_restarts), float(ns.monitor_interval)
        unkillable, commit_timeout = float(ns.unkillable_timeout), float(ns.commit_timeout)
        hang = parse_hang(ns.hang_timeout, float(ns.first_step_timeout))
        shown = frozenset(int(r) for r in ns.local_ranks_filter.split(",")) if ns.local_ranks_filter else None
    except ValueError as exc:
        raise ConfigError(f"a numeric flag has a value that is not a number: {exc}") from None
    nproc = parse_nproc(ns.nproc_per_node)
    redirects = parse_std("--redirects", ns.redirects, nproc)
    log_dir = ns.log_dir
    if log_dir is None and (redirects or parse_std("--tee", ns.tee, nproc)):
        log_dir = tempfile.mkdtemp(prefix="elastic-logs-")  # as torchrun does
        print(f"{PROG}: worker logs in {log_dir}", file=sys.stderr)
    given_id = ns.rdzv_id if ns.rdzv_id != "none" else None  # "none": torchrun's default, no id
    run_id = given_id or (uuid.uuid4().hex[:12] if endpoint is None else "default")
    config = LaunchConfig(
        entrypoint=ns.entrypoint, args=tuple(ns.args), min_nodes=min_nodes, max_nodes=max_nodes,
        nproc_per_node=nproc, rdzv_endpoint=endpoint, run_id=run_id,
        max_restarts=max_restarts, monitor_interval=monitor, grace=grace, commit_timeout=commit_timeout,
        unkillable_timeout=unkillable,
        module=ns.module and not ns.run_path,
        no_python=ns.no_python and not ns.run_path, checkpoint_dir=ns.checkpoint_dir, log_dir=log_dir,
        redirects=redirects, local_ranks_filter=shown, hang=hang, node_id=ns.node_id,
        local_addr=ns.local_addr, warm_pool=ns.warm_pool, reconfigure=ns.reconfigure,
        rdzv=RendezvousSettings.parse(ns.rdzv_conf),
        same_failure_limit=_int_flag("--same-failure-limit", ns.same_failure_limit),
        **live_options(ns),
        static=choice.static, embedded_etcd=choice.embedded, role=ns.role,
        signals=parse_signals(ns.signals_to_handle), virtual_local_rank=ns.virtual_local_rank,
        cpu_binding=cpus_near_gpus(ns.numa_binding, nproc) if numa_mode(ns.numa_binding) else None,
    )
    say_ignored(ns, choice.note)  # once the line is known to be good: an error stays one line
    return config


def _int_flag(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be a whole number") from None


def _install_signal_handlers(agent: Agent, signals: tuple[int, ...]) -> None:
    """--signals-to-handle (SIGTERM, SIGINT, SIGHUP, SIGQUIT) ask the agent to stop; it acts at
    its next check, never mid-request."""

    def handler(signum, _frame):
        agent.request_stop(signum)

    for signum in signals:
        signal.signal(signum, handler)


def _etcd_config(config: LaunchConfig, endpoint: str) -> EtcdConfig:
    return EtcdConfig(endpoint, ca_cert=config.rdzv.ca_cert, cert=config.rdzv.cert, key=config.rdzv.key,
                      user=config.rdzv.user, password=config.rdzv.password, timeout=config.rdzv.connect_timeout)


def _etcd_rendezvous(config: LaunchConfig, endpoint: str, local: bool, node_id: str) -> EtcdRendezvous:
    etcd = _etcd_config(config, endpoint)
    # The endpoint's host may start its etcd after us (c10d): wait for it as for peers.
    client = connect_when_up(etcd, config.rdzv.join_timeout) if config.embedded_etcd else connect(etcd)
    addr = config.local_addr or ("127.0.0.1" if local else outgoing_addr(etcd.host, etcd.port))
    backend = EtcdBackend(client, config.rdzv.key_prefix, config.run_id, node_id,
                          retry_for=config.rdzv.outage_timeout)
    return EtcdRendezvous(backend, config, addr, lambda: free_port(addr))


def run(config: LaunchConfig) -> int:
    server, embedded = None, None
    # Agents sharing an etcd need distinct ids; a standalone or static agent has no peer to clash with.
    slot = None if config.node_id or config.static or config.standalone else NodeSlot(config.run_id)
    node_id = config.node_id or (slot.node_id if slot else socket.gethostname())
    if config.static is not None and not config.node_id:
        node_id += f"-node{config.static.node_rank}"
    try:
        if config.static is not None:
            endpoint = ""  # no etcd: the workers' round fence is off, as under torchrun
            # The address toward node 0: where this node's workers bind (GLOO_SOCKET_IFNAME).
            addr = config.local_addr or outgoing_addr(config.static.addr, config.static.port)
            rendezvous = StaticRendezvous(config.static, config.max_nodes, config.nproc_per_node, node_id, addr)
        else:
            if config.standalone:
                server = EtcdServer().start()
            elif config.embedded_etcd:
                embedded = EmbeddedEtcd(config.rdzv_endpoint)
            endpoint = config.rdzv_endpoint or server.endpoint
            rendezvous = _etcd_rendezvous(config, endpoint, server is not None, node_id)
        events_path = os.path.join(config.log_dir, "events.jsonl") if config.log_dir else None
        events = EventLog(events_path, run_id=config.run_id, node_id=node_id)
        agent = Agent(config, rendezvous, events, endpoint)
        _install_signal_handlers(agent, config.signals)
        try:
            result = agent.run()
        finally:
            events.close()
        print(result.summary(), file=sys.stderr)
        return result.exit_code
    finally:
        for signum in config.signals:
            signal.signal(signum, signal.SIG_IGN)
        if server is not None:
            server.stop()
        if embedded is not None and embedded.server is not None:
            _outlive_peers(config, embedded)
        if slot is not None:
            slot.close()


def _outlive_peers(config: LaunchConfig, embedded: EmbeddedEtcd) -> None:
    """The rendezvous' etcd runs here: stop it only once the other agents are gone."""
    try:
        client = connect(_etcd_config(config, config.rdzv_endpoint))
        try:
            embedded.wait_for_peers(client, config.rdzv.key_prefix, config.run_id,
                                    timeout=config.grace + config.rdzv.lease_ttl + 10)
        finally:
            client.close()
    except ElasticError as exc:
        print(f"{PROG}: the rendezvous etcd served here stops without waiting for peers: {exc}", file=sys.stderr)
    finally:
        embedded.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # `elastic-run report EVENTS...` (a script named report: ./report)
        return goodput.main(argv[1:])
    if argv[:1] == ["status"]:  # `elastic-run status --rdzv-endpoint HOST:PORT --rdzv-id RUN_ID`
        return status_cli.main(argv[1:])
    logging.basicConfig(level=os.environ.get("ELASTIC_LOG_LEVEL", "WARNING"),
                        format=f"[{PROG}] %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        return run(config_from_args(ns))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (RendezvousError, ElasticError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1

