"""`elastic-run status --rdzv-endpoint HOST:PORT --rdzv-id RUN_ID [--watch [S]] [--json]`.

Reads etcd only (never a worker): one transaction per look (elastic/rendezvous/status_key.py),
shown as tables (rich on a terminal, plain text otherwise) or as JSON (schema in docs/CLI.md;
with --watch, one JSON object per line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from elastic.errors import ConfigError, ElasticError
from elastic.launcher.status_view import build_view
from elastic.rendezvous.etcd_client import TRANSIENT_ERRORS, EtcdConfig, connect
from elastic.rendezvous.settings import RendezvousSettings
from elastic.rendezvous.status_key import read_run

PROG = "elastic-run status"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Show a running (or finished) job from etcd: its state, round, "
                "nodes, steps, checkpoints, restarts and goodput.")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=os.environ.get("PET_RDZV_ENDPOINT"),
                   help="HOST:PORT of the job's etcd")
    p.add_argument("--rdzv-id", "--rdzv_id", default=os.environ.get("PET_RDZV_ID"), help="the job's run id")
    p.add_argument("--rdzv-conf", "--rdzv_conf", default=os.environ.get("PET_RDZV_CONF", ""),
                   help="the job's --rdzv-conf (key_prefix, TLS: ca_cert,cert,key; auth: user,password_file)")
    p.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                   help="show it again every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema: docs/CLI.md)")
    p.add_argument("--straggler-factor", type=float, default=2.0,
                   help="flag nodes busy more than this x the others' median per step (default 2; 0: never)")
    return p


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    if not ns.rdzv_endpoint or not ns.rdzv_id:
        print(f"{PROG}: error: give the job's --rdzv-endpoint HOST:PORT and --rdzv-id RUN_ID", file=sys.stderr)
        return 2
    if ns.watch is not None and ns.watch <= 0:
        print(f"{PROG}: error: --watch {ns.watch:g} must be > 0 seconds", file=sys.stderr)
        return 2
    try:
        settings = RendezvousSettings.parse(ns.rdzv_conf)
        client = connect(EtcdConfig(ns.rdzv_endpoint, ca_cert=settings.ca_cert, cert=settings.cert, key=settings.key,
                                    user=settings.user, password=settings.password,
                                    timeout=settings.connect_timeout))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except ElasticError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    try:
        return _show(client, ns, settings)
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


def _show(client, ns: argparse.Namespace, settings: RendezvousSettings) -> int:
    while True:
        try:
            run = read_run(client, settings.key_prefix, ns.rdzv_id)
        except TRANSIENT_ERRORS as exc:
            print(f"{PROG}: error: etcd at {ns.rdzv_endpoint} did not answer ({type(exc).__name__})", file=sys.stderr)
            return 1
        if run.revision == 0:
            print(f"{PROG}: error: no job {ns.rdzv_id!r} in etcd at {ns.rdzv_endpoint} (key prefix "
                  f"{settings.key_prefix!r}): check --rdzv-id and --rdzv-conf key_prefix", file=sys.stderr)
            return 1
        view = build_view(run, settings, ns.straggler_factor, time.time())
        if ns.json:
            print(json.dumps(view, indent=None if ns.watch else 2), flush=True)
        elif sys.stdout.isatty():
            _print_rich(view, clear=ns.watch is not None)
        else:
            print(plain_text(view), flush=True)
        if ns.watch is None:
            return 0
        time.sleep(ns.watch)  # the next look; etcd is read only this often


def headline(view: dict) -> list[str]:
    """The job in a few lines (shared by both renderings)."""
    r = view["restarts"]
    checkpoint = f"step {view['checkpoint']['step']}" if view["checkpoint"] else "none"
    if view.get("memory_checkpoint"):
        checkpoint += f" (memory: step {view['memory_checkpoint']['step']})"
    lines = [(f"run {view['run_id']}: {view['state'].upper()}   round {view['round']} "
              f"(sealed {_v(view['sealed_round'])}), {view['num_nodes']} nodes, world size {_v(view['world_size'])}"),
             f"restarts {r['used']} of {_v(r['max'])}   goodput {_pct(view['goodput'])}   newest checkpoint: {checkpoint}"]
    if view["closed"]:
        lines.append(f"closed ({'ok' if view['closed']['ok'] else 'failed'}): {view['closed']['reason']}")
    elif view["last_round_end"]:
        lines.append(f"round {view['round'] - 1} ended: {view['last_round_end']['reason']}")
    if view["stragglers"]:
        lines.append("stragglers: " + ", ".join(view["stragglers"]))
    return lines


COLUMNS = ("node", "role", "state", "rank", "procs", "step", "steps/s", "busy/step", "ckpt", "fails", "cooldown")


def rows(view: dict) -> list[tuple[str, ...]]:
    return [(n["node"] + (" (straggler)" if n["straggler"] else ""), n["role"], n["state"], _v(n["group_rank"]),
             _v(n["nproc"]), _v(n["step"]), _v(n["steps_per_s"]), _v(n["busy_per_step"]), _v(n["checkpoint_step"]),
             str(n["failures"]), f"{n['cooldown_left']:g}s" if n["cooldown_left"] else "-") for n in view["nodes"]]


def plain_text(view: dict) -> str:
    table = [COLUMNS, *rows(view)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    body = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join([*headline(view), "", *body])


def _print_rich(view: dict, *, clear: bool) -> None:
    from rich.console import Console  # only on a terminal: rich takes a while to import
    from rich.table import Table

    console = Console()
    if clear:
        console.clear()
    for line in headline(view):
        console.print(line, highlight=False)
    table = Table(*COLUMNS)
    for row, node in zip(rows(view), view["nodes"]):
        table.add_row(*row, style="red" if node["straggler"] or node["state"] == "gone" else None)
    console.print(table)


def _v(value: object) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
