"""The request-identity headers a sidecar adds or carries on: ``x-request-id``, W3C trace
context (``traceparent``, ``tracestate``) and ``x-forwarded-for``.

The contract with the proxy, per request (header names are the lower-case constants):

- ``request_id, added = ensure_request_id(headers, rng)``: keep a sane incoming id, else
  make a UUID4 (from the injected ``Random``); when ``added``, set the header upstream.
  The id goes into the access log and back on the response.
- ``incoming = Traceparent.parse(headers.get(TRACEPARENT))``; ``outgoing =
  next_hop(incoming, rng)``; send ``outgoing.format()`` upstream and log
  ``outgoing.trace_id``. A valid incoming trace is continued (same trace id, a new span
  id for this hop, the sampled flag kept); a missing or invalid one starts a new,
  sampled trace.
- ``tracestate``: passed on untouched (vendors' opaque list; a proxy adds no entry of
  its own) as long as the incoming ``traceparent`` was valid; with a new trace it is
  dropped, since it described another trace (``tracestate_to_forward``).
- ``x_forwarded_for(headers.get(XFF), client_ip)``: the client's address appended.

W3C Trace Context parsing (Level 1, section 3.2 and "versioning"): version ``00`` is
exactly ``00-<32 hex>-<16 hex>-<2 hex>``, lower-case hex, neither id all zeros.
Version ``ff`` is invalid. A higher version is read the same way from its first 55
characters, which must be followed by the end or a ``-``, and only its sampled bit is
kept. We always send version 00; of the flags only ``sampled`` (Level 1 asks to zero
the bits it does not define).

Pure: never imports asyncio, socket or ssl; never reads the clock or ``random`` but the
``Random`` it is handed (no ``uuid.uuid4()``, which reads the OS); never logs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from sidecar.routing import HeaderLookup

REQUEST_ID = b"x-request-id"
TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
X_FORWARDED_FOR = b"x-forwarded-for"

SAMPLED = 0x01
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")  # visible ASCII; longer ids are replaced
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_V00_LENGTH = 55
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


# UUID4 bits (RFC 9562 §5.4): the version nibble 4 and the variant 10, as uuid.UUID sets.
_UUID4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def new_request_id(rng: random.Random) -> bytes:
    """A UUID4 (version and variant bits set) drawn from ``rng``; the same text
    ``str(uuid.UUID(int=..., version=4))`` gives, without building the UUID."""
    h = b"%032x" % ((rng.getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET)
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def ensure_request_id(headers: HeaderLookup, rng: random.Random) -> tuple[bytes, bool]:
    """``(id, added)``: the incoming ``x-request-id`` if it is 1-200 visible ASCII
    characters, else a new UUID4 with ``added=True`` (the proxy then sets or replaces it)."""
    value = headers.get(REQUEST_ID)
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value, False
    return new_request_id(rng), True


@dataclass(frozen=True, slots=True)
class Traceparent:
    """A version-00 ``traceparent``: ids as lower-case hex, flags as an int."""

    trace_id: str  # 32 hex digits, not all zero
    parent_id: str  # 16 hex digits, not all zero: the span id of the hop that sends it
    flags: int = SAMPLED

    def __post_init__(self) -> None:
        if not (
            _TRACE_ID.fullmatch(self.trace_id)
            and _SPAN_ID.fullmatch(self.parent_id)
            and self.trace_id != _ZERO_TRACE
            and self.parent_id != _ZERO_SPAN
            and 0 <= self.flags <= 0xFF
        ):
            raise ValueError(
                f"not a valid trace context: trace_id {self.trace_id!r} (32 lower-case hex), "
                f"parent_id {self.parent_id!r} (16 lower-case hex), flags {self.flags} (0-255)"
            )

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    @classmethod
    def parse(cls, value: bytes | str | None) -> Traceparent | None:
        """The header's value, or None when it is missing or invalid (start a new trace)."""
        if value is None:
            return None
        raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
        raw = raw.strip(b" \t")
        m = _TRACEPARENT.match(raw)
        if m is None:
            return None
        version = m.group(1)
        if version == b"00":
            if len(raw) != _V00_LENGTH:
                return None
            flags = int(m.group(4), 16)
        elif version == b"ff":
            return None
        else:  # a future version: its first fields read as 00's, then the end or "-"
            if len(raw) > _V00_LENGTH and raw[_V00_LENGTH] != 0x2D:
                return None
            flags = int(m.group(4), 16) & SAMPLED
        trace_id, parent_id = m.group(2).decode(), m.group(3).decode()
        if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
            return None
        return cls(trace_id, parent_id, flags)

    def format(self) -> bytes:
        """The header value to send: version 00, flags other than sampled zeroed."""
        return b"00-%s-%s-%02x" % (
            self.trace_id.encode("ascii"),
            self.parent_id.encode("ascii"),
            self.flags & SAMPLED,
        )

    def __str__(self) -> str:
        return self.format().decode("ascii")


def _nonzero_bits(rng: random.Random, bits: int) -> int:
    while True:
        value = rng.getrandbits(bits)
        if value:
            return value


def next_hop(incoming: Traceparent | None, rng: random.Random) -> Traceparent:
    """The ``traceparent`` to send upstream: ``incoming``'s trace with a new span id, or
    a new sampled trace."""
    span = f"{_nonzero_bits(rng, 64):016x}"
    if incoming is None:
        return _trusted(f"{_nonzero_bits(rng, 128):032x}", span, SAMPLED)
    return _trusted(incoming.trace_id, span, incoming.flags & SAMPLED)


_new_traceparent = object.__new__
_set = object.__setattr__


def _trusted(trace_id: str, span: str, flags: int) -> Traceparent:
    """A Traceparent from parts known to be valid (a checked trace id, fresh non-zero
    hex ids): the per-request hot path skips ``__post_init__``'s regular expressions."""
    tp = _new_traceparent(Traceparent)
    _set(tp, "trace_id", trace_id)
    _set(tp, "parent_id", span)
    _set(tp, "flags", flags)
    return tp


def tracestate_to_forward(incoming: Traceparent | None, tracestate: bytes | None) -> bytes | None:
    """``tracestate`` untouched while its trace continues; None (drop it) when the
    incoming ``traceparent`` was missing or invalid."""
    return tracestate if incoming is not None else None


def x_forwarded_for(existing: bytes | None, client_ip: str) -> bytes:
    """``x-forwarded-for`` with ``client_ip`` appended (``a, b, client``)."""
    ip = client_ip.encode("ascii")
    if existing is None:
        return ip
    existing = existing.strip(b" \t,")
    return existing + b", " + ip if existing else ip
