"""The client's error type, :class:`CapsyncError`, with the server's ``capsync/...`` marker.

The server reports every refusal as a Cap'n Proto exception whose description starts with a
stable marker (``capsync/revoked: share ...``); Cap'n Proto may put a prefix such as
``remote exception:`` in front, so the marker is searched for, as the Rust client does
(``schema/src/marker.rs``). Load shedding uses the ``overloaded`` exception type, which maps to
``capsync/overloaded`` even without a marker in the text.

What a caller does with an error follows from two properties:

- :attr:`CapsyncError.retryable`: reconnecting may help (the connection failed or dropped, the
  server is overloaded or failed internally, or a ``capsync/gap`` that a full replay heals);
- :attr:`CapsyncError.terminal_state`: the ref must stop being used (``revoked``,
  ``expired``, ``unknown-token``, ``denied``, ``diverged``); its ops stay in the outbox.

No message built here ever contains a token: every text is passed through
:func:`capsync.uri.redact_secrets`.
"""

from __future__ import annotations

from typing import Optional

from .uri import redact_secrets

__all__ = [
    "MARKERS",
    "REVOKED",
    "EXPIRED",
    "UNKNOWN_TOKEN",
    "DENIED",
    "INVALID",
    "GAP",
    "DIVERGED",
    "TOO_LARGE",
    "OVERLOADED",
    "INTERNAL",
    "CapsyncError",
    "RefStoppedError",
    "InvalidInputError",
    "find_marker",
    "terminal_state",
]

REVOKED = "capsync/revoked"
EXPIRED = "capsync/expired"
UNKNOWN_TOKEN = "capsync/unknown-token"
DENIED = "capsync/denied"
INVALID = "capsync/invalid"
GAP = "capsync/gap"
DIVERGED = "capsync/diverged"
TOO_LARGE = "capsync/too-large"
OVERLOADED = "capsync/overloaded"
INTERNAL = "capsync/internal"

#: Every marker the server uses, as in ``schema/src/marker.rs``.
MARKERS = (REVOKED, EXPIRED, UNKNOWN_TOKEN, DENIED, INVALID, GAP, DIVERGED, TOO_LARGE, OVERLOADED, INTERNAL)

_TERMINAL = {
    REVOKED: "revoked",
    EXPIRED: "expired",
    UNKNOWN_TOKEN: "unknown-token",
    DENIED: "denied",
    DIVERGED: "diverged",
}
_RETRYABLE_MARKERS = {OVERLOADED, INTERNAL, GAP}


def find_marker(description: str) -> Optional[str]:
    """The marker ``description`` carries (searched, not only at position 0), if any.

    ``capsync/gapping`` is not ``capsync/gap``: a marker must not be followed by another
    alphanumeric character or ``-``.
    """
    at = description.find("capsync/")
    if at < 0:
        return None
    rest = description[at:]
    for marker in MARKERS:
        if rest.startswith(marker):
            after = rest[len(marker):len(marker) + 1]
            if not (after and (after.isascii() and after.isalnum() or after == "-")):
                return marker
    return None


def terminal_state(marker: Optional[str]) -> Optional[str]:
    """The ref state a refusal with ``marker`` leaves a ref in, or ``None`` if a retry may help.

    Mirrors ``terminal_state`` in the Rust client's ``sync.rs``: a gap is healed by the next
    round, which resends every unacked batch in order.
    """
    return _TERMINAL.get(marker) if marker else None


class CapsyncError(Exception):
    """An error of the capsync client.

    Attributes:
        marker: the server's ``capsync/...`` marker, or ``None``.
        kind: ``"failed"``, ``"overloaded"``, ``"disconnected"``, ``"unimplemented"`` (Cap'n
            Proto exception types), ``"connect"`` (dialing failed), ``"timeout"``,
            ``"invalid"`` (bad input or a malformed answer), ``"stopped"`` (the ref was
            refused before), or ``"storage"``.
    """

    def __init__(self, message: str, marker: Optional[str] = None, kind: str = "failed") -> None:
        message = redact_secrets(message)
        super().__init__(message)
        self.message = message
        self.marker = marker
        self.kind = kind

    @property
    def retryable(self) -> bool:
        """Whether reconnecting may help (see the module docs)."""
        if self.kind in ("connect", "timeout"):
            return True
        if self.kind in ("invalid", "stopped", "storage"):
            return False
        if self.marker is not None:
            return self.marker in _RETRYABLE_MARKERS
        return self.kind in ("disconnected", "overloaded")

    @property
    def terminal_state(self) -> Optional[str]:
        """The state the ref goes to (``revoked``...), or ``None`` if it is not a final refusal."""
        return terminal_state(self.marker)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, marker={self.marker!r}, kind={self.kind!r})"

    @classmethod
    def from_exception(cls, exc: BaseException) -> "CapsyncError":
        """Wraps a pycapnp ``KjException``, an ``OSError`` or a timeout."""
        if isinstance(exc, CapsyncError):
            return exc
        kj_type = _kj_type(exc)
        if kj_type is not None:
            description = _kj_description(exc)
            kind = kj_type.lower()
            marker = find_marker(description)
            if marker is None and kind == "overloaded":
                marker = OVERLOADED
            if marker is not None:
                text = description[description.find(marker):] if marker in description else f"{marker}: {description}"
            elif kind == "disconnected":
                text = f"disconnected: {description}"
            else:
                text = description
            return cls(text, marker=marker, kind=kind)
        if isinstance(exc, TimeoutError):
            return cls(f"timed out: {exc}" if str(exc) else "timed out", kind="timeout")
        if isinstance(exc, (ConnectionError, EOFError)):
            return cls(f"disconnected: {exc}", kind="disconnected")
        if isinstance(exc, OSError):
            return cls(f"cannot connect: {exc}", kind="connect")
        return cls(f"{type(exc).__name__}: {exc}", kind="failed")


class RefStoppedError(CapsyncError):
    """The ref was refused before (revoked, expired...) and is not used until re-attached."""

    def __init__(self, name: str, state: str, reason: str) -> None:
        marker = find_marker(reason) or {v: k for k, v in _TERMINAL.items()}.get(state)
        super().__init__(f"ref {name} is {state}: {reason}", marker=marker, kind="stopped")
        self.name = name
        self.state = state


class InvalidInputError(CapsyncError, ValueError):
    """A change or argument the client refuses before anything is queued or sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, marker=None, kind="invalid")


def _kj_type(exc: BaseException) -> Optional[str]:
    """The Cap'n Proto exception type of a pycapnp ``KjException`` (``FAILED``...), else None."""
    if type(exc).__name__ != "KjException":
        return None
    try:
        kj_type = exc.type  # type: ignore[attr-defined]
        if callable(kj_type):
            kj_type = kj_type()
    except Exception:
        kj_type = None
    return str(kj_type) if kj_type else "FAILED"


def _kj_description(exc: BaseException) -> str:
    try:
        description = exc.description  # type: ignore[attr-defined]
    except Exception:
        description = None
    return str(description if description else exc)
