"""Turn the user's `state` mapping into one tree of plain values and tensors, and back.

`state` maps names to objects with state_dict()/load_state_dict() (modules, optimizers,
schedulers), tensors, or JSON values. Modules and optimizers go through
torch.distributed.checkpoint.state_dict, so their keys are parameter names (FQNs), not
indices, and DDP / FSDP2 wrappers are handled; FSDP2 state stays as DTensors (local shards).

`flatten` splits a tree into a JSON skeleton (each tensor replaced by {"__tensor__": key})
and a dict of tensors keyed by "/"-joined paths (components escaped as in JSON pointers).
Dicts with non-string keys are stored as {"__items__": [[key, value], ...]} and tuples as
{"__tuple__": [...]}, so a round trip gives back the same Python types.

A `PerRank` entry holds a value that differs between ranks. Each rank flattens its own
under "<name>/rank<5 digits>", so the ranks' tensor keys never collide; the manifest stores
the entry as {"__per_rank__": {"<rank>": skeleton of that rank}}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

TENSOR_TAG = "__tensor__"
ITEMS_TAG = "__items__"
TUPLE_TAG = "__tuple__"
PER_RANK_TAG = "__per_rank__"
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class PerRank:
    """A `state` entry whose value differs between ranks (RNG streams, rank-local buffers).

    In a process group each rank saves its own value (tensors and JSON alike) and, on load,
    gets its own value back, which needs the same world size as when saving. At another
    world size, load() raises CheckpointMismatchError naming the entry, unless
    `on_resize="keep"`: then the entry keeps its current value and the rest is loaded.
    `value` is anything a plain entry can be, except DTensors (already sharded: pass those
    without PerRank). After load() a JSON value is replaced by a new PerRank wrapper.
    """

    value: Any
    on_resize: str = "error"

    def __post_init__(self) -> None:
        if self.on_resize not in ("error", "keep"):
            raise ValueError(f"PerRank(on_resize={self.on_resize!r}) must be 'error' or 'keep'")


def unwrap(obj: Any) -> Any:
    return obj.value if isinstance(obj, PerRank) else obj


def rank_root(name: str, rank: int) -> str:
    """Where rank `rank`'s tensors of PerRank entry `name` are keyed."""
    return f"{escape(name)}/rank{rank:05d}"


def flatten_state(state: Mapping[str, Any], rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], set[str]]:
    """flatten(collect(state)) with PerRank entries keyed under this rank's root.

    Returns (skeleton, tensors, keys of the tensors that are this rank's own).
    """
    per_rank = [n for n, obj in state.items() if isinstance(obj, PerRank)]
    plain = {n: unwrap(obj) for n, obj in state.items()}
    skeleton, tensors = flatten(collect(plain), roots={n: rank_root(n, rank) for n in per_rank})
    roots = {escape(n) for n in per_rank}
    own = {k for k in tensors if k.split("/", 1)[0] in roots}
    for key in own:
        if is_dtensor(tensors[key]):
            raise TypeError(
                f"{key}: a DTensor is already sharded across ranks; pass it without PerRank"
            )
    return skeleton, tensors, own


def _owner_module(name: str, optim: torch.optim.Optimizer, state: Mapping[str, Any]) -> torch.nn.Module:
    """The module whose parameter names key this optimizer's state (a ModuleDict if several)."""
    ids = {id(p) for group in optim.param_groups for p in group["params"]}
    modules = {n: unwrap(m) for n, m in state.items() if isinstance(unwrap(m), torch.nn.Module)}
    owners = {n: m for n, m in modules.items() if any(id(p) in ids for p in m.parameters())}
    if not owners:
        raise ValueError(
            f"optimizer {name!r} updates no parameter of any module in `state`; put its model in "
            "the same state mapping so optimizer state can be keyed by parameter names"
        )
    if len(owners) == 1:
        return next(iter(owners.values()))
    return torch.nn.ModuleDict(owners)


def collect(state: Mapping[str, Any]) -> dict[str, Any]:
    """name -> plain tree (nested dicts/lists of tensors and JSON values)."""
    tree: dict[str, Any] = {}
    for name, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            tree[name] = get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            tree[name] = get_optimizer_state_dict(_owner_module(name, obj, state), obj)
        elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
            tree[name] = obj.state_dict()
        else:
            tree[name] = obj
    return tree


def apply(state: MutableMapping[str, Any], loaded: Mapping[str, Any]) -> None:
    """Load `loaded` (names of `state`) into the live objects; JSON values replace entries."""
    modules_first = sorted(loaded, key=lambda n: not isinstance(unwrap(state[n]), torch.nn.Module))
    for name in modules_first:
        wrapper, value = state[name], loaded[name]
        obj = unwrap(wrapper)
        if isinstance(obj, torch.nn.Module):
            set_model_state_dict(obj, value)
        elif isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(_owner_module(name, obj, state), obj, value)
        elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
            obj.load_state_dict(value)
        elif isinstance(obj, torch.Tensor):
            local = obj.to_local() if is_dtensor(obj) else obj
            with torch.no_grad():  # a bare nn.Parameter in `state` is a leaf that requires grad
                local.copy_(value.to_local() if is_dtensor(value) else value)
        elif isinstance(wrapper, PerRank):
            state[name] = dataclasses.replace(wrapper, value=value)
        else:
            state[name] = value


# JSON scalars by exact type (subclasses still go through walk()): a list of only these, such
# as an RNG state of thousands of ints, is kept as it is, without a call and a path per element.
_PLAIN = frozenset({int, float, str, bool, type(None)})


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def flatten(
    tree: Mapping[str, Any], roots: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`roots[name]` (default: the escaped name) prefixes the keys of the tensors under `name`."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise TypeError(f"{path}: only dense (strided) tensors can be saved, got {value.layout}")
            tensors[path] = value
            return {TENSOR_TAG: path}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value):
                reserved = {TENSOR_TAG, ITEMS_TAG, TUPLE_TAG, PER_RANK_TAG} & set(value)
                if reserved:
                    raise ValueError(f"{path}: the keys {sorted(reserved)} are reserved by the checkpoint format")
                return {k: walk(v, f"{path}/{escape(k)}") for k, v in value.items()}
            items, seen = [], set()
            for k, v in value.items():
                if not isinstance(k, _SCALARS):
                    raise TypeError(f"{path}: dict key {k!r} of type {type(k).__name__} is not a JSON scalar")
                part = escape(str(k))
                if part in seen:
                    raise ValueError(f"{path}: keys {k!r} and another key print the same; use distinct keys")
                seen.add(part)
                items.append([k, walk(v, f"{path}/{part}")])
            return {ITEMS_TAG: items}
        if isinstance(value, tuple):
            return {TUPLE_TAG: [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            if all(type(v) in _PLAIN for v in value):  # e.g. an RNG state: thousands of ints, no tensor
                return list(value)
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, _SCALARS):
            return value
        if isinstance(value, (torch.dtype, torch.device)):
            raise TypeError(f"{path}: {value!r} is not JSON-serialisable; store it as a string")
        raise TypeError(
            f"{path}: value of type {type(value).__name__} is neither a tensor nor JSON-serialisable; "
            "store tensors, numbers, strings, lists or dicts (or an object with state_dict())"
        )

    for name in tree:
        if not isinstance(name, str) or not name:
            raise TypeError(f"state names must be non-empty strings, got {name!r}")
    skeleton = {name: walk(value, (roots or {}).get(name, escape(name))) for name, value in tree.items()}
    return skeleton, tensors


def unflatten(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR_TAG}:
            return tensors[skeleton[TENSOR_TAG]]
        if set(skeleton) == {ITEMS_TAG}:
            return {k: unflatten(v, tensors) for k, v in skeleton[ITEMS_TAG]}
        if set(skeleton) == {TUPLE_TAG}:
            return tuple(unflatten(v, tensors) for v in skeleton[TUPLE_TAG])
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def json_safe_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"metric {k!r}={v!r} must be a number")
        out[str(k)] = float(v)
    return out
