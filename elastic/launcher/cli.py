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
from elastic.rendezvous.handler import EtcdRendezvous

PROG = "elastic-run"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + traceback-like noise
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _flag(parser: argparse.ArgumentParser, name: str, *extra: str, **kwargs) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run a PyTorch training script on elastic, fault-tolerant "
                "workers (torchrun-compatible flags).")
    _flag(p, "nnodes", default="1", help="N or MIN:MAX nodes (default 1)")
    _flag(p, "nproc-per-node", default="1", help="workers per node: N, auto, cpu or gpu")
    _flag(p, "rdzv-backend", default="etcd", help="only etcd (v3) is supported")
    _flag(p, "rdzv-endpoint", default="", help="HOST:PORT of etcd; empty: a private etcd (standalone)")
    _flag(p, "rdzv-id", default=None, help="job id scoping every rendezvous key")
    _flag(p, "rdzv-conf", default="", help="k=v,... e.g. join_timeout=600,last_call_timeout=2,"
          "lease_ttl=5,outage_timeout=60,probe_timeout=2,key_prefix=elastic,world_size_multiple=1,ca_cert=,cert=,"
          "key=,user=,password_file= (or $ELASTIC_RDZV_PASSWORD)")
    _flag(p, "standalone", action="store_true", help="single node with a private etcd on loopback")
    _flag(p, "max-restarts", default="0", help="job-wide restarts after failures (default 0)")
    _flag(p, "monitor-interval", default="0.1", help="seconds between worker checks (default 0.1)")
    _flag(p, "grace", default="5", help="seconds between SIGTERM and SIGKILL when stopping workers")
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
    _flag(p, "node-id", default=None, help="stable id of this node (default: host name)")
    _flag(p, "local-addr", default=None, help="address peers reach this node at")
    _flag(p, "module", "-m", action="store_true", help="run the entry point as a module (python -m)")
    _flag(p, "no-python", action="store_true", help="run the entry point as a program, not with python")
    p.add_argument("entrypoint", help="training script (or module with -m, program with --no-python)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return p


def config_from_args(ns: argparse.Namespace) -> LaunchConfig:
    if ns.rdzv_backend not in ("etcd", "etcd-v3", "etcd_v3"):
        raise ConfigError(f"--rdzv-backend {ns.rdzv_backend!r} is not supported; use etcd (v3)")
    min_nodes, max_nodes = parse_nnodes(ns.nnodes)
    endpoint = ns.rdzv_endpoint or None
    if ns.standalone:
        if endpoint:
            raise ConfigError("--standalone starts its own etcd: drop --rdzv-endpoint (or --standalone)")
        min_nodes = max_nodes = 1
    try:
        max_restarts, monitor, grace = int(ns.max_restarts), float(ns.monitor_interval), float(ns.grace)
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
    run_id = ns.rdzv_id or (uuid.uuid4().hex[:12] if endpoint is None else "default")
    return LaunchConfig(
        entrypoint=ns.entrypoint, args=tuple(ns.args), min_nodes=min_nodes, max_nodes=max_nodes,
        nproc_per_node=nproc, rdzv_endpoint=endpoint, run_id=run_id,
        max_restarts=max_restarts, monitor_interval=monitor, grace=grace, commit_timeout=commit_timeout,
        unkillable_timeout=unkillable,
        module=ns.module,
        no_python=ns.no_python, checkpoint_dir=ns.checkpoint_dir, log_dir=log_dir,
        redirects=redirects, local_ranks_filter=shown, hang=hang, node_id=ns.node_id,
        local_addr=ns.local_addr, warm_pool=ns.warm_pool, reconfigure=ns.reconfigure,
        rdzv=RendezvousSettings.parse(ns.rdzv_conf),
        same_failure_limit=_int_flag("--same-failure-limit", ns.same_failure_limit),
    )


def _int_flag(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be a whole number") from None


def _install_signal_handlers(agent: Agent) -> None:
    """SIGTERM/SIGINT ask the agent to stop; it acts at its next check, never mid-request."""

    def handler(signum, _frame):
        agent.request_stop(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run(config: LaunchConfig) -> int:
    server = None
    try:
        if config.standalone:
            server = EtcdServer().start()
        endpoint = config.rdzv_endpoint or server.endpoint
        etcd = EtcdConfig(endpoint, ca_cert=config.rdzv.ca_cert, cert=config.rdzv.cert,
                          key=config.rdzv.key, user=config.rdzv.user, password=config.rdzv.password,
                          timeout=config.rdzv.connect_timeout)
        client = connect(etcd)
        addr = config.local_addr or ("127.0.0.1" if server else outgoing_addr(etcd.host, etcd.port))
        node_id = config.node_id or socket.gethostname()
        events_path = os.path.join(config.log_dir, "events.jsonl") if config.log_dir else None
        events = EventLog(events_path, run_id=config.run_id, node_id=node_id)
        backend = EtcdBackend(client, config.rdzv.key_prefix, config.run_id, node_id,
                              retry_for=config.rdzv.outage_timeout)
        rendezvous = EtcdRendezvous(backend, config, addr, lambda: free_port(addr))
        agent = Agent(config, rendezvous, events, endpoint)
        _install_signal_handlers(agent)
        try:
            result = agent.run()
        finally:
            events.close()
        print(result.summary(), file=sys.stderr)
        return result.exit_code
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # `elastic-run report EVENTS...` (a script named report: ./report)
        return goodput.main(argv[1:])
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

