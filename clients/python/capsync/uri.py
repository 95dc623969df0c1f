"""Sturdy URIs: ``capsync://HOST:PORT/TOKEN`` (plain TCP) or ``capsyncs://HOST:PORT/TOKEN`` (TLS).

The rules are those of the Rust implementation (``schema/src/uri.rs`` and ``token.rs``):

- leading and trailing Unicode whitespace is ignored;
- the scheme is ``capsyncs://`` (TLS) or ``capsync://``;
- the address is everything up to the first ``/``; it splits at its *last* ``:`` into a host
  and a port. The host is a DNS name or IPv4 address (only ``[A-Za-z0-9.-]``, 1 to 253 bytes)
  or an IPv6 address in brackets; the port is a ``u16`` as Rust parses it (ASCII digits with
  an optional leading ``+``);
- the token is ``csy_`` followed by exactly 43 base64url characters (``[A-Za-z0-9_-]``).

A :class:`Token` and a :class:`SturdyUri` never show the secret in ``repr``/``str``/``format``;
only :meth:`Token.expose` and :meth:`SturdyUri.expose` give it, for the wire or a file the user
asked for.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NoReturn, Optional, Tuple

__all__ = ["SCHEME", "TLS_SCHEME", "Token", "SturdyUri", "UriError", "parse_uri", "redact_secrets"]

SCHEME = "capsync://"
TLS_SCHEME = "capsyncs://"
TOKEN_PREFIX = "csy_"
_BODY_LEN = 43

# Characters Rust's `str::trim` removes: Unicode White_Space (Python's str.strip() would also
# remove U+001C..U+001F, which Rust keeps).
_RUST_WHITESPACE = (
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_TOKEN_BODY = re.compile(r"[A-Za-z0-9_-]{%d}" % _BODY_LEN, re.ASCII)
_HOST_CHARS = re.compile(r"[A-Za-z0-9.-]+", re.ASCII)
_PORT = re.compile(r"\+?[0-9]+", re.ASCII)
_ANY_TOKEN = re.compile(r"csy_[A-Za-z0-9_-]{%d}" % _BODY_LEN, re.ASCII)


class UriError(ValueError):
    """A string that is not a sturdy URI. The message never contains any part of the input.

    ``kind`` is ``"shape"``, ``"address"`` or ``"token"`` (the Rust ``UriError`` variants).
    """

    MESSAGES = {
        "shape": "a sturdy URI looks like capsync://HOST:PORT/TOKEN (or capsyncs:// for TLS)",
        "address": "the URI's address needs a host and a port",
        "token": "the URI's token is malformed: a token starts with `csy_` followed by 43 base64url characters",
    }

    def __init__(self, kind: str) -> None:
        super().__init__(self.MESSAGES[kind])
        self.kind = kind


def redact_secrets(text: str) -> str:
    """``text`` with every token-shaped substring replaced by ``csy_<redacted>``."""
    return _ANY_TOKEN.sub("csy_<redacted>", text)


class Token:
    """A bearer secret: ``csy_`` + 43 base64url characters. Redacted in every formatting."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        body = text[len(TOKEN_PREFIX):] if text.startswith(TOKEN_PREFIX) else None
        if body is None or _TOKEN_BODY.fullmatch(body) is None:
            raise UriError("token")
        self._text = text

    @classmethod
    def parse(cls, text: str) -> "Token":
        """Checks the shape only; whether the server knows the token is for the server to say."""
        return cls(text)

    def expose(self) -> str:
        """The secret text, for the wire or a file the user asked for."""
        return self._text

    def __repr__(self) -> str:
        return "Token(csy_<redacted>)"

    def __str__(self) -> str:
        return "csy_<redacted>"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Token) and other._text == self._text

    def __hash__(self) -> int:
        return hash(self._text)

    def __reduce__(self) -> NoReturn:  # pickling would be a way to print it; refuse
        raise TypeError("a Token is not picklable")


def _valid_host(host: str) -> bool:
    """A DNS name or IPv4 address (``[A-Za-z0-9.-]``, at most 253 bytes), or an IPv6 address in
    brackets (as Rust's ``Ipv6Addr`` parses it: no zone id)."""
    if host.startswith("[") and host.endswith("]") and len(host) >= 2:
        inner = host[1:-1]
        if "%" in inner or not inner.isascii():
            return False
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return False
        return True
    return 0 < len(host) <= 253 and _HOST_CHARS.fullmatch(host) is not None


def _valid_port(port: str) -> bool:
    """Whether Rust's ``port.parse::<u16>()`` accepts ``port``."""
    if _PORT.fullmatch(port) is None:
        return False
    return int(port.lstrip("+")) <= 0xFFFF


class SturdyUri:
    """A parsed sturdy URI. ``str``/``repr`` show ``capsync://HOST:PORT/csy_<redacted>``.

    Attributes: ``address`` (``HOST:PORT`` as given), ``token`` (a :class:`Token`), ``tls``
    (``capsyncs://``: connect with TLS and verify the server).
    """

    __slots__ = ("address", "token", "tls")

    def __init__(self, address: str, token: Token, tls: bool = False) -> None:
        self.address = address
        self.token = token
        self.tls = tls

    @classmethod
    def parse(cls, text: str) -> "SturdyUri":
        """Parses ``text``; raises :class:`UriError` (which never quotes the input)."""
        text = text.strip(_RUST_WHITESPACE)
        if text.startswith(TLS_SCHEME):
            tls, rest = True, text[len(TLS_SCHEME):]
        elif text.startswith(SCHEME):
            tls, rest = False, text[len(SCHEME):]
        else:
            raise UriError("shape")
        address, slash, token = rest.partition("/")
        if not slash:
            raise UriError("shape")
        host, colon, port = address.rpartition(":")
        if not colon or not _valid_host(host) or not _valid_port(port):
            raise UriError("address")
        return cls(address, Token.parse(token), tls)

    @property
    def host(self) -> str:
        """The host part of the address, without brackets around an IPv6 literal."""
        host = self.address.rpartition(":")[0] if ":" in self.address else self.address
        return host.lstrip("[").rstrip("]")

    @property
    def port(self) -> int:
        """The port, as a number."""
        return int(self.address.rpartition(":")[2].lstrip("+"))

    @property
    def scheme(self) -> str:
        return TLS_SCHEME if self.tls else SCHEME

    def with_address(self, address: str) -> "SturdyUri":
        """The same token (and TLS choice) at another ``HOST:PORT``."""
        return SturdyUri.parse(f"{self.scheme}{address}/{self.token.expose()}")

    def expose(self) -> str:
        """The full URI with its secret, for the one place that must hand it over."""
        return f"{self.scheme}{self.address}/{self.token.expose()}"

    def redacted(self) -> str:
        """The URI with the token redacted, safe for logs and status output."""
        return f"{self.scheme}{self.address}/{self.token}"

    def __repr__(self) -> str:
        return f"SturdyUri({self.redacted()})"

    def __str__(self) -> str:
        return self.redacted()

    def __format__(self, spec: str) -> str:
        return format(self.redacted(), spec)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SturdyUri)
            and (other.address, other.token, other.tls) == (self.address, self.token, self.tls)
        )

    def __hash__(self) -> int:
        return hash((self.address, self.token, self.tls))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SturdyUri is not picklable")

    def host_port(self) -> Tuple[str, int]:
        """``(host, port)`` to dial."""
        return self.host, self.port


def parse_uri(text: str) -> SturdyUri:
    """Shorthand for :meth:`SturdyUri.parse`."""
    return SturdyUri.parse(text)


def try_parse(text: str) -> Optional[SturdyUri]:
    """The parsed URI, or ``None`` when ``text`` is not one."""
    try:
        return SturdyUri.parse(text)
    except UriError:
        return None
