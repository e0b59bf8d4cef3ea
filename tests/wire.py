"""The lines tests and their workers exchange: JSON that keeps bytes and bytes-keyed
dicts. A module of its own, light to import: every worker process starts with it."""

from __future__ import annotations

import json
from typing import Any


def _to_json(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$b": bytes(obj).hex()}
    if isinstance(obj, dict):
        return {"$d": [[_to_json(k), _to_json(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_to_json(x) for x in obj]
    return obj


def _from_json(obj: dict[str, Any]) -> Any:
    if "$b" in obj:
        return bytes.fromhex(obj["$b"])
    if "$d" in obj:
        return {_hashable(k): v for k, v in obj["$d"]}
    return obj


def _hashable(obj: Any) -> Any:
    return tuple(_hashable(x) for x in obj) if isinstance(obj, list) else obj


def encode(obj: Any) -> str:
    return json.dumps(_to_json(obj))


def decode(text: str) -> Any:
    return json.loads(text, object_hook=_from_json)
