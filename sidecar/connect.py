"""Opening the mutual-TLS leg to a peer sidecar, for the L4 relay and the L7 pool alike.

For: connect + handshake under one timeout, then the check that the peer presents
exactly the SPIFFE ID the control plane lists for that endpoint. Every failure becomes
``ConnectFailed`` with a short, stable reason (the ``reason`` label of
``meshlet_tcp_connect_errors_total``).

TLS 1.3 session resumption: with a ``SessionCache``, a connection that succeeded and
passed the identity check leaves its session (the server's ticket, which ``TlsLeg``
has read before its handshake resolves) under (address, port, expected identity), tied
to the client context it was made with; the next connection there offers it. A resumed
connection skips certificate verification but not the identity check: OpenSSL keeps
the peer's leaf in the session, and it is checked here as on a full handshake.

Must never: return a leg whose peer identity was not checked, build an SSLContext
(the caller passes the one for its protocol: no ALPN for L4, ``http/1.1`` for L7),
offer a session made with another context (a rotated leaf or bundle starts over with a
full handshake), past its ticket lifetime or its peer's certificate, or keep one after
any failure to that endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from cryptography import x509

from certs.spiffe import SpiffeIdError
from certs.spiffe import parse as parse_spiffe_id
from certs.verify import Expectation, check_identity
from meshlet.model import Endpoint
from sidecar.tlsleg import TlsHandshakeError, TlsLeg

log = logging.getLogger(__name__)


SESSION_CACHE_SIZE = 1024


class _Cached(NamedTuple):
    ctx: ssl.SSLContext
    session: ssl.SSLSession
    expires: float  # wall clock (OpenSSL's session times are wall clock)


class SessionCache:
    """TLS sessions to offer again, per (address, port, expected identity); LRU-bounded.

    An entry is used only with the very context that made it: a new leaf or trust bundle
    means new contexts (``sidecar.identity``), so entries from before a rotation are
    dropped when next looked at, never offered.
    """

    def __init__(
        self, capacity: int = SESSION_CACHE_SIZE, *, now: Callable[[], float] = time.time
    ) -> None:
        self.capacity = capacity
        self._now = now
        self._entries: OrderedDict[tuple[str, int, str], _Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(endpoint: Endpoint) -> tuple[str, int, str]:
        return (endpoint.address, endpoint.inbound_port, endpoint.identity)

    def get(self, endpoint: Endpoint, ctx: ssl.SSLContext) -> ssl.SSLSession | None:
        key = self._key(endpoint)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.ctx is not ctx or self._now() >= entry.expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.session

    def put(
        self, endpoint: Endpoint, ctx: ssl.SSLContext, session: ssl.SSLSession, peer_until: float
    ) -> None:
        """Keep ``session`` (made with ``ctx``) until its ticket or ``peer_until`` expires."""
        if not session.has_ticket or self.capacity <= 0:
            return
        expires = min(float(session.time + session.timeout), peer_until)
        if expires <= self._now():
            return
        key = self._key(endpoint)
        self._entries[key] = _Cached(ctx, session, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def drop(self, endpoint: Endpoint) -> None:
        self._entries.pop(self._key(endpoint), None)

    def clear(self) -> None:
        self._entries.clear()


class ConnectFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def open_mtls(
    endpoint: Endpoint,
    ctx: ssl.SSLContext,
    connect_s: float,
    *,
    sessions: SessionCache | None = None,
) -> TlsLeg:
    """A TlsLeg to ``endpoint``'s inbound port whose peer is ``endpoint.identity``; with
    ``sessions``, resuming the last session there when one is cached."""
    offer = sessions.get(endpoint, ctx) if sessions is not None else None
    try:
        leg = await _open_checked(endpoint, ctx, connect_s, offer)
    except ConnectFailed:
        if sessions is not None:
            sessions.drop(endpoint)
        raise
    if sessions is None or leg.session_reused():
        # Resumed: the cached ticket stays in use until it expires (reading the renewed
        # one costs a third of a millisecond per connection; reusing a ticket is fine
        # without early data). Its expiry still ends it, then a full handshake renews it.
        return leg
    if (session := leg.session()) is not None:
        der = leg.peer_certificate()
        assert der is not None  # _open_checked checked it
        until = x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
        sessions.put(endpoint, ctx, session, until)
    return leg


async def _open_checked(
    endpoint: Endpoint, ctx: ssl.SSLContext, connect_s: float, offer: ssl.SSLSession | None
) -> TlsLeg:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_s):
            _, leg = await loop.create_connection(
                lambda: TlsLeg(
                    ctx, server_side=False, handshake_timeout_s=connect_s, session=offer
                ),
                endpoint.address,
                endpoint.inbound_port,
            )
            await leg.handshake
    except TimeoutError:
        raise ConnectFailed("timeout") from None
    except TlsHandshakeError as e:
        raise ConnectFailed(f"tls_{e.reason}") from None
    except OSError as e:
        raise ConnectFailed(
            "refused" if isinstance(e, ConnectionRefusedError) else "connect_error"
        ) from None
    der = leg.peer_certificate()
    try:
        expect = Expectation.exactly(parse_spiffe_id(endpoint.identity))
    except SpiffeIdError:
        leg.abort()
        raise ConnectFailed("bad_identity") from None
    verdict = check_identity(x509.load_der_x509_certificate(der), expect) if der else None
    if verdict is None or not verdict.ok:
        leg.abort()
        log.warning(
            "peer identity refused",
            extra={"endpoint": endpoint.id, "want": endpoint.identity, "verdict": str(verdict)},
        )
        raise ConnectFailed(f"identity_{verdict.reason.value if verdict else 'none'}")
    return leg
