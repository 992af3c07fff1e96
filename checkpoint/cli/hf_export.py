"""A Hugging Face model directory from a checkpoint (`elastic-ckpt export --format hf`).

`transformers`' `from_pretrained(DIR)` reads DIR/config.json and DIR/model.safetensors.
The tensors written are those whose manifest key starts with the prefix (the state entry the
model was saved under: "model/" for TrainLoop and `CheckpointManager.save(step, {"model":
net})`), named by the rest of the key, which is the module's parameter name
("transformer.wte.weight"); each is assembled whole and verified as for the plain export.
Excluded names leave out tensors the model ties to another one on load (GPT-2's
lm_head.weight), as `save_pretrained` does. config.json is copied from a local file or from
a JSON state entry of the checkpoint. Nothing here knows a model architecture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from checkpoint.cli.catalog import Root
from checkpoint.cli.export import data_bytes, full_tensors, write_file
from checkpoint.errors import CheckpointError
from checkpoint.format import statedict
from checkpoint.format.manifest import Manifest

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class HfOptions:
    """What `--format hf` takes: the key prefix, one config source, the names to leave out."""

    prefix: str
    config_file: str | None = None
    config_entry: str | None = None
    exclude: tuple[str, ...] = ()


def export_hf(root: Root, step: int, dest: str, options: HfOptions, *, overwrite: bool) -> tuple[int, int]:
    """Write checkpoint `step` as the directory `dest`; returns (tensors, bytes of data)."""
    if options.config_file is None and options.config_entry is None:
        raise CheckpointError(
            "--format hf needs the model's config.json: pass --config FILE or --config-entry NAME "
            "(a state entry of the checkpoint holding it as JSON)"
        )
    manifest = root.manager.manifest(step)
    names = select(manifest, options.prefix, options.exclude)
    config = config_text(manifest, options)
    _prepare(dest, overwrite)
    tensors = full_tensors(root, manifest, names.values())
    model = {name: tensors[key] for name, key in names.items()}
    # The weights first: an interrupted export leaves no config.json, so nothing loads it.
    write_file(model, os.path.join(dest, MODEL_FILE), {"format": "pt"})
    _write_text(os.path.join(dest, CONFIG_FILE), config)
    return len(model), data_bytes(model)


def select(manifest: Manifest, prefix: str, exclude: Sequence[str]) -> dict[str, str]:
    """{name in the model: manifest key} for the keys under `prefix`, less `exclude`."""
    rests = {key[len(prefix):]: key for key in manifest.tensors if key.startswith(prefix)}
    if not rests:
        entries = sorted({key.split("/", 1)[0] + "/" for key in manifest.tensors})
        raise CheckpointError(
            f"no tensor of step {manifest.step} starts with --prefix {prefix!r}; its tensor names "
            f"start with {', '.join(entries) or 'nothing (it holds no tensors)'}"
        )
    cut = sorted(rest for rest in rests if not rest or rest.startswith("/"))
    if cut:
        raise CheckpointError(
            f"--prefix {prefix!r} ends inside a name (it leaves {cut[0]!r}); end it at a '/', "
            f"e.g. --prefix {prefix.rstrip('/')}/"
        )
    # Keys escape '/' and '~' inside a name as in JSON pointers; parameter names rarely hold either.
    names = {rest.replace("~1", "/").replace("~0", "~"): key for rest, key in rests.items()}
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise CheckpointError(
            f"--exclude {unknown[0]!r} is not a tensor under --prefix {prefix!r} in step "
            f"{manifest.step}; names there look like {', '.join(sorted(names)[:3])}"
        )
    return {name: key for name, key in sorted(names.items()) if name not in exclude}


def config_text(manifest: Manifest, options: HfOptions) -> str:
    """The text of config.json: the file's, or the state entry's (JSON text, or a JSON object)."""
    if options.config_file is not None:
        source = f"--config {options.config_file}"
        try:
            with open(options.config_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {source} ({exc}); pass the model's config.json") from exc
    else:
        name = options.config_entry
        source = f"--config-entry {name!r}"
        if name not in manifest.state:
            raise CheckpointError(
                f"step {manifest.step} has no state entry {name!r} for --config-entry; "
                f"its entries are {', '.join(sorted(manifest.state))}"
            )
        value = manifest.state[name]
        try:
            text = value if isinstance(value, str) else json.dumps(statedict.unflatten(value, {}), indent=2) + "\n"
        except KeyError as exc:  # a tensor tag: unflatten found no tensor of that key
            raise CheckpointError(f"{source} holds tensors; it must hold the config as JSON") from exc
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{source} is not JSON ({exc}); it must hold the model's config.json") from exc
    if not isinstance(parsed, dict):
        raise CheckpointError(
            f"{source} holds a JSON {type(parsed).__name__}; config.json is a JSON object "
            '(e.g. {"model_type": "gpt2", ...})'
        )
    return text


def _prepare(dest: str, overwrite: bool) -> None:
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise CheckpointError(f"{dest} is a file; --format hf writes a directory: pass a directory for --to")
    present = [f for f in (MODEL_FILE, CONFIG_FILE) if os.path.exists(os.path.join(dest, f))]
    if present and not overwrite:
        raise CheckpointError(f"{dest} already holds {present[0]}; pass --force to overwrite it or choose another --to")
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create {dest} ({exc}); check that its parent is writable") from exc


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"cannot write {path} ({exc}); check that its directory is writable") from exc
