"""Changes an application queues (:class:`Put`, :class:`Delete`) and their validation into
:class:`~capsync.outbox.Op` with a fresh opId, with the checks of the Rust client's
``validate`` (``client/src/api.rs``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from .errors import InvalidInputError
from .outbox import KINDS, Op, uuid7

__all__ = ["MAX_DATA_BYTES", "JsonData", "Put", "Delete", "Change", "encode_data", "validate"]

#: Largest ``data`` the client accepts (the server's default limit).
MAX_DATA_BYTES = 1024 * 1024

JsonData = Union[str, bytes, bytearray, memoryview, Dict[str, Any], List[Any], int, float, bool, None]


@dataclass(frozen=True)
class Put:
    """A change that inserts or replaces an entity."""

    kind: str
    id: str
    data: JsonData
    parent: str = ""


@dataclass(frozen=True)
class Delete:
    """A change that deletes an entity (a message takes its parts with it)."""

    kind: str
    id: str


Change = Union[Put, Delete]


def encode_data(data: JsonData) -> bytes:
    """``data`` as UTF-8 JSON bytes: ``bytes``/``str`` are taken as JSON text, anything else
    (a dict...) is serialized with ``json.dumps``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        return data.encode("utf-8")
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"data is not JSON-serializable: {exc}") from None


def _check_json(data: bytes) -> Optional[str]:
    """Why ``data`` is not valid UTF-8 JSON as serde_json reads it, or None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "data is not valid UTF-8"

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return "data is not valid JSON"
    stack = [value]
    while stack:  # lone surrogates (\ud800) are valid for Python's json, not for serde_json
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "data is not valid JSON"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def validate(change: Change) -> Op:
    """The op for ``change`` with a fresh opId; the checks of the Rust client's ``validate``."""

    def check_id(value: str, what: str) -> None:
        if not isinstance(value, str):
            raise InvalidInputError(f"{what} must be a string")
        if not 1 <= len(value.encode("utf-8")) <= 256:
            raise InvalidInputError(f"{what} is 1 to 256 bytes")

    if change.kind not in KINDS:
        raise InvalidInputError(f"unknown kind {change.kind!r}; use session, message, part, diff or model")
    check_id(change.id, "an id")
    if isinstance(change, Delete):
        return Op(uuid7(), change.kind, change.id, "", b"", True)
    if not isinstance(change.parent, str) or len(change.parent.encode("utf-8")) > 256:
        raise InvalidInputError("a parent id is a string of at most 256 bytes")
    data = encode_data(change.data)
    if len(data) > MAX_DATA_BYTES:
        raise InvalidInputError(f"data is {len(data)} bytes; the limit is {MAX_DATA_BYTES}")
    problem = _check_json(data)
    if problem:
        raise InvalidInputError(problem)
    if change.kind == "part" and not change.parent:
        raise InvalidInputError("a part needs its parent message's id")
    return Op(uuid7(), change.kind, change.id, change.parent, data, False)
