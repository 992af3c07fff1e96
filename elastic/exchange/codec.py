"""One JSON codec for the records that cross a process boundary (etcd keys, files between
an agent and its workers).

A record is a frozen dataclass that inherits `Record`. Decoding takes the fields the class
knows and ignores the rest, so agents of two versions can share a job during a rolling
upgrade (a newer agent may add a field; an older one reads past it), and a field the writer
did not know takes its default. Field values are JSON values, tuples of them, nested records,
or optionals of these.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    """Mixin for a frozen dataclass that is written as one JSON object."""

    def to_json(self) -> str:
        return json.dumps(_plain(self), separators=(",", ":"))

    @classmethod
    def from_json(cls: type[R], raw: str | bytes | Mapping[str, Any]) -> R:
        """Raises ValueError when `raw` is not a JSON object with this record's required fields."""
        data = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        return _decode(cls, data)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _decode(cls: type[R], data: Any) -> R:
    if not isinstance(data, Mapping):
        raise ValueError(f"a {cls.__name__} record must be a JSON object, not {type(data).__name__}")
    hints = _hints(cls)
    known = {f.name: _convert(hints[f.name], data[f.name])
             for f in dataclasses.fields(cls) if f.init and f.name in data}
    try:
        return cls(**known)
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"not a {cls.__name__} record: {exc}") from None


def _convert(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(_convert(args[0], v) for v in value)
    if isinstance(hint, type) and issubclass(hint, Record):
        return _decode(hint, value)
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of `cls` (string annotations under `from __future__`), once."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]
