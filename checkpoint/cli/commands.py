"""`elastic-ckpt` (also `python -m checkpoint`): inspect, prune, verify, export and import.

Exit codes: 0 success; 1 `verify` found a damaged checkpoint (a bad file or an unreadable
manifest); 2 an error (bad arguments, a
URL that does not exist or is not a checkpoint root, permission denied, an unreadable
manifest), reported as one line on stderr, never a traceback. See docs/CLI.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from checkpoint import retention
from checkpoint.cli import catalog, export, hf_export, progress_bar, views
from checkpoint.io import storage
from checkpoint.errors import CheckpointCorruptError, CheckpointError
from checkpoint.cli.tables import WIDTH, fit, size

EXIT_OK, EXIT_DAMAGED, EXIT_ERROR = 0, 1, 2
PROG = "elastic-ckpt"


class UsageError(Exception):
    """Arguments that parse but do not make sense together."""


def parse_storage_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value (e.g. anon=true)")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(args.storage_option or [])


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


# ---------------------------------------------------------------- inspect


def _marks(args: argparse.Namespace, entries: Sequence[catalog.StepEntry]) -> views.Marks:
    infos = catalog.infos(entries)
    names = catalog.metric_names(entries)
    metric = args.metric or (names[0] if len(names) == 1 else None)
    if args.metric and args.metric not in names:
        raise UsageError(_unknown_metric(args.metric, names, args.url))
    best = retention.rank_best(infos, metric, args.mode)[: args.keep_best] if metric else []
    latest = max((i.step for i in infos), default=None)
    return views.Marks(latest=latest, best=tuple(best), metric=metric, mode=args.mode, keep_best=args.keep_best)


def _checked(root: catalog.Root, entry: catalog.StepEntry) -> catalog.StepEntry:
    """The entry marked corrupt, with the first bad file as its error, if any file is bad."""
    if entry.manifest is None:
        return entry
    bad = catalog.check(root, entry.manifest)
    if not bad:
        return entry
    return dataclasses.replace(entry, status=catalog.CORRUPT, error=bad[0])


def cmd_inspect(args: argparse.Namespace, now: float) -> int:
    root = catalog.open_root(args.url, _options(args))
    entries = catalog.scan(root)
    if args.verify:
        entries = [_checked(root, e) for e in entries]
    if args.step is not None:
        return _inspect_step(args, root, entries, now)
    marks = _marks(args, entries)
    if args.json:
        print(views.dumps(views.list_json(args.url, entries, marks, now)))
    else:
        print("\n".join(views.list_text(args.url, entries, marks, now)))
    return EXIT_OK


def _inspect_step(args: argparse.Namespace, root: catalog.Root, entries: Sequence[catalog.StepEntry], now: float) -> int:
    manifest = root.manager.manifest(args.step)
    (entry,) = [e for e in entries if e.step == args.step]
    if args.json:
        print(views.dumps(views.step_json(args.url, entry, manifest, now)))
    else:
        print("\n".join(views.step_text(args.url, entry, manifest, now)))
    return EXIT_OK


# ---------------------------------------------------------------- prune


def _unknown_metric(metric: str, names: Sequence[str], url: str) -> str:
    known = ", ".join(names) if names else "none (no checkpoint records metrics)"
    return f"metric {metric!r} is not recorded by any checkpoint in {url}; metrics that exist: {known}"


def _policy(args: argparse.Namespace) -> retention.RetentionPolicy:
    if args.keep_last is None and args.keep_best is None and not args.incomplete:
        raise UsageError("prune needs --keep-last N, --keep-best K --metric NAME, or --incomplete")
    if (args.keep_best is None) != (args.metric is None):
        raise UsageError("--keep-best K and --metric NAME go together; pass both or neither")
    try:
        return retention.RetentionPolicy(
            keep_last=args.keep_last, keep_best=args.keep_best, metric=args.metric, mode=args.mode
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _rule(policy: retention.RetentionPolicy) -> str:
    parts = []
    if policy.keep_last is not None:
        parts.append(f"the {policy.keep_last} newest")
    if policy.keep_best is not None:
        parts.append(f"the {policy.keep_best} best by {policy.metric} ({policy.mode})")
    return "keeping " + (" and ".join(parts) if parts else "every committed checkpoint")


def cmd_prune(args: argparse.Namespace, now: float) -> int:
    policy = _policy(args)
    root = catalog.open_root(
        args.url, _options(args),
        keep_last=policy.keep_last, keep_best=policy.keep_best, metric=policy.metric, mode=policy.mode,
    )
    entries = {e.step: e for e in catalog.scan(root)}
    names = catalog.metric_names(list(entries.values()))
    if policy.metric is not None and policy.metric not in names:
        raise UsageError(_unknown_metric(policy.metric, names, args.url))
    # The manager's own decision (retention policy + uncommitted leftovers), nothing re-derived.
    doomed = [s for s in root.manager.prune(dry_run=True, all_runs=True) if s in entries]
    leftovers = [s for s in doomed if entries[s].status == catalog.INCOMPLETE]
    chosen = [s for s in doomed if args.incomplete or s not in leftovers]
    print(fit(f"policy: {_rule(policy)}", WIDTH))
    verb = "would delete" if args.dry_run else "deleted"
    for step in chosen:
        if not args.dry_run:
            storage.delete_step(root.loc, step)
        e = entries[step]
        print(f"{verb} step {step} ({e.status}, {size(e.nbytes)}, {_files(e.nfiles)})")
    freed = sum(entries[s].nbytes for s in chosen)
    kept = [s for s, e in entries.items() if s not in chosen]
    print(fit(f"{'would free' if args.dry_run else 'freed'} {size(freed)} in {len(chosen)} checkpoints; "
              f"kept steps: {', '.join(map(str, kept)) or 'none'}", WIDTH))
    skipped = [s for s in leftovers if s not in chosen]
    if skipped:
        print(fit(f"kept incomplete steps {', '.join(map(str, skipped))}; --incomplete deletes them "
                  "(when no job writes here)", WIDTH))
    return EXIT_OK


# ---------------------------------------------------------------- verify


def _verify_one(root: catalog.Root, step: int, mode: str) -> list[str]:
    """Check one committed step; prints the outcome and returns one message per bad file."""
    try:
        manifest = root.manager.manifest(step)
    except CheckpointCorruptError as exc:
        print(f"step {step}: BAD {_one_line(exc)}", file=sys.stderr)
        return [str(exc)]
    total = catalog.total_bytes(manifest)
    bar = progress_bar.ProgressBar(sys.stderr, total, f"step {step}") if progress_bar.wanted(sys.stderr, total, mode) else None
    try:
        bad = catalog.check(root, manifest, on_chunk=bar.advance if bar else None)
    finally:
        if bar is not None:
            bar.close()
    if not bad:
        print(f"step {step}: ok ({_files(len(manifest.files))}, {size(total)})")
    for message in bad:
        print(f"step {step}: BAD {message}", file=sys.stderr)
    return bad


def cmd_verify(args: argparse.Namespace, now: float) -> int:
    root = catalog.open_root(args.url, _options(args))
    if args.step is not None:
        return EXIT_DAMAGED if _verify_one(root, args.step, args.progress) else EXIT_OK
    damaged = 0
    for e in catalog.scan(root):
        if e.status == catalog.INCOMPLETE:
            print(f"step {e.step}: incomplete (no manifest), nothing to verify")
        else:
            damaged += bool(_verify_one(root, e.step, args.progress))
    return EXIT_DAMAGED if damaged else EXIT_OK


# ---------------------------------------------------------------- export / import


def cmd_export(args: argparse.Namespace, now: float) -> int:
    hf_only = args.prefix is not None or args.config is not None or args.config_entry is not None or args.exclude
    if args.format == "safetensors" and hf_only:
        raise UsageError("--prefix, --config, --config-entry and --exclude go with --format hf")
    if args.format == "hf" and args.prefix is None:
        raise UsageError("--format hf needs --prefix: the key prefix of the model's tensors, "
                         "e.g. --prefix model/ (see elastic-ckpt inspect URL --step N)")
    root = catalog.open_root(args.url, _options(args))
    if args.format == "hf":
        hf = hf_export.HfOptions(args.prefix, args.config, args.config_entry, tuple(args.exclude or ()))
        count, nbytes = hf_export.export_hf(root, args.step, args.to, hf, overwrite=args.force)
    else:
        count, nbytes = export.export(root, args.step, args.to, overwrite=args.force)
    print(f"exported step {args.step}: {count} tensors, {size(nbytes)} to {args.to}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace, now: float) -> int:
    count = export.import_file(args.file, args.url, args.step, _options(args))
    print(f"imported {args.file}: {count} tensors as committed step {args.step} of {args.url}")
    return EXIT_OK


# ---------------------------------------------------------------- arguments


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage-option", "--storage_option", metavar="KEY=VALUE", type=parse_storage_option, action="append",
        help="fsspec storage option (repeatable); VALUE is parsed as JSON when it can be (anon=true)",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, prune, verify and export checkpoints on any fsspec URL.",
        epilog="exit codes: 0 ok, 1 verify found damage, 2 error. Reference: docs/CLI.md",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", parents=[common], help="list checkpoints, or the tensors of one")
    p.add_argument("url", metavar="URL")
    p.add_argument("--step", type=_non_negative, help="show the tensors and state of this step")
    p.add_argument("--json", action="store_true", help="machine-readable output (docs/CLI.md)")
    p.add_argument("--verify", action="store_true", help="re-hash files; mark damaged checkpoints corrupt")
    p.add_argument("--metric", help="mark best by this metric (default: the only metric, if one)")
    p.add_argument("--mode", choices=("min", "max"), default="min")
    p.add_argument("--keep-best", "--keep_best", type=_non_negative, default=1, metavar="K")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", parents=[common], help="delete what the retention policy lets go")
    p.add_argument("url", metavar="URL")
    p.add_argument("--keep-best", "--keep_best", type=_non_negative, metavar="K")
    p.add_argument("--metric", metavar="NAME")
    p.add_argument("--mode", choices=("min", "max"), default="min")
    p.add_argument("--keep-last", "--keep_last", type=int, metavar="N")
    p.add_argument("--incomplete", action="store_true", help="also remove uncommitted leftovers")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print what would be deleted")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("verify", parents=[common], help="re-hash files against the manifest")
    p.add_argument("url", metavar="URL")
    p.add_argument("--step", type=_non_negative, help="verify only this step (default: every one)")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bar on stderr (auto: on a terminal, for large checkpoints)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", parents=[common],
                       help="write one consolidated safetensors file, or a Hugging Face model directory")
    p.add_argument("url", metavar="URL")
    p.add_argument("--step", type=_non_negative, required=True)
    p.add_argument("--to", required=True, metavar="PATH",
                   help="local path of the .safetensors file (of the directory, with --format hf)")
    p.add_argument("--force", action="store_true", help="overwrite what is at PATH")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="hf: PATH/model.safetensors + PATH/config.json, as transformers' from_pretrained reads")
    p.add_argument("--prefix", help="hf: the key prefix of the model's tensors, cut from their names (model/)")
    config = p.add_mutually_exclusive_group()
    config.add_argument("--config", metavar="FILE", help="hf: the config.json to copy")
    config.add_argument("--config-entry", "--config_entry", metavar="NAME",
                        help="hf: the checkpoint's state entry holding config.json as JSON")
    p.add_argument("--exclude", action="append", metavar="NAME",
                   help="hf: leave out this tensor (repeatable), e.g. a tied lm_head.weight")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", parents=[common], help="save a safetensors file as a checkpoint")
    p.add_argument("file", metavar="FILE")
    p.add_argument("url", metavar="URL")
    p.add_argument("--step", type=_non_negative, required=True)
    p.set_defaults(func=cmd_import)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        return args.func(args, time.time())
    except BrokenPipeError:
        # The reader went away (| head); silence the flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (CheckpointError, UsageError, OSError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
