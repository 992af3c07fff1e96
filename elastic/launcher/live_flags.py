"""`elastic-run`'s flags for seeing a running job: the metrics port and the straggler rules,
added to the CLI's parser and turned into LaunchConfig fields here (one place for both)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from elastic.errors import ConfigError


def add_live_flags(parser: argparse.ArgumentParser, flag: Callable[..., None]) -> None:
    """Add the flags with the CLI's `flag` helper (dashes or underscores, PET_* defaults)."""
    flag(parser, "metrics-port", default=None, help="serve Prometheus metrics of this node's agent on this "
         "port (e.g. 9400; see deploy/grafana/ for a dashboard)")
    flag(parser, "straggler-factor", default="2", help="a node whose ranks are busy more than this x the "
         "median of the other nodes' per step is flagged as a straggler (events log, status); 0 disables (default 2)")
    flag(parser, "exclude-stragglers", action="store_true", help="treat a node that stays a straggler for "
         "--straggler-window seconds like a failed node (a restart, cooldown; a spare replaces it)")
    flag(parser, "straggler-window", default="60", help="seconds a straggler stays slow before "
         "--exclude-stragglers excludes it (default 60)")


def live_options(ns: argparse.Namespace) -> dict[str, object]:
    """The LaunchConfig fields of these flags."""
    try:
        port = int(ns.metrics_port) if ns.metrics_port not in (None, "") else None
        factor, window = float(ns.straggler_factor), float(ns.straggler_window)
    except ValueError as exc:
        raise ConfigError(f"--metrics-port, --straggler-factor and --straggler-window take numbers: {exc}") from None
    return {"metrics_port": port, "straggler_factor": factor, "exclude_stragglers": ns.exclude_stragglers,
            "straggler_window": window}
