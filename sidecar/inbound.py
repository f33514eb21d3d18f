"""Inbound: mutual TLS from peer sidecars, terminated here and relayed to the app.

The listener (15006) takes TLS 1.3 only and requires a client certificate from the
mesh's trust bundle; the caller's SPIFFE ID must be one the service's policy allows.
Plaintext, an unknown CA, an expired or unwelcome certificate are refused during the
handshake and counted by reason — the app is connected to only after all checks pass,
so no byte of a refused caller ever reaches it. Draining stops accepting and waits.

A connection whose ALPN is ``http/1.1`` (an L7 outbound sidecar offers it) goes to the
L7 handler (``l7``, ``sidecar.l7_inbound``), one whose ALPN is ``h2`` to the HTTP/2
handler (``h2``, ``sidecar.h2_inbound``); one without ALPN is relayed byte for byte.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from cryptography import x509

from certs.spiffe import SpiffeId
from certs.verify import Expectation, check_identity
from sidecar.authz import caller_allowed
from sidecar.catalog import Catalog
from sidecar.config import SidecarConfig
from sidecar.identity import ALPN_H2, ALPN_HTTP1, Contexts
from sidecar.metrics import SidecarMetrics
from sidecar.outbound import Open
from sidecar.relay import PlainSide, Relay, RelayStats
from sidecar.tlsleg import TlsHandshakeError, TlsLeg

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 5.0


class Inbound:
    def __init__(
        self,
        cfg: SidecarConfig,
        *,
        trust_domain: str,
        catalog: Callable[[], Catalog],
        contexts: Callable[[], Contexts],
        metrics: SidecarMetrics,
        connections: set[Open],
        l7: Callable[[TlsLeg, SpiffeId], Awaitable[None]] | None = None,
        h2: Callable[[TlsLeg, SpiffeId], Awaitable[None]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.l7 = l7
        self.h2 = h2
        self.trust_domain = trust_domain
        self.catalog = catalog
        self.contexts = contexts
        self.metrics = metrics
        self.connections = connections
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.service_key = f"{cfg.namespace}/{cfg.service}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.cfg.inbound
        self.server = await loop.create_server(self._accepted, host, port, reuse_address=True)

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def stop(self) -> None:
        self.stop_accepting()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accepted(self) -> TlsLeg:
        # The context is read per connection: a renewed certificate serves new callers
        # at once, while connections already open keep theirs.
        ctx = self.contexts().server
        leg = TlsLeg(
            ctx, server_side=True, handshake_timeout_s=HANDSHAKE_TIMEOUT_S, hold_until_accept=True
        )
        task = asyncio.get_running_loop().create_task(self._serve_guarded(leg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return leg

    def _refuse(self, leg: TlsLeg, reason: str, detail: str) -> None:
        self.metrics.handshake_failures.labels("inbound", reason).inc()
        log.info(
            "inbound connection refused",
            extra={"reason": reason, "detail": detail, "peer": str(leg.peername)},
        )
        leg.refuse()  # close_notify in place of the session ticket: the caller counts a refusal

    async def _serve_guarded(self, leg: TlsLeg) -> None:
        try:
            await self._serve(leg)
        except asyncio.CancelledError:
            leg.abort()
            raise
        except Exception:
            log.exception("inbound connection failed")
            leg.abort()

    async def _serve(self, leg: TlsLeg) -> None:
        try:
            await leg.handshake
        except TlsHandshakeError as e:
            self.metrics.handshake_failures.labels("inbound", e.reason).inc()
            return
        der = leg.peer_certificate()
        if der is None:
            self._refuse(leg, "no_certificate", "the caller presented no certificate")
            return
        leaf = x509.load_der_x509_certificate(der)
        verdict = check_identity(leaf, Expectation(trust_domain=self.trust_domain))
        if not verdict.ok or verdict.spiffe_id is None:
            self._refuse(leg, verdict.reason.value, verdict.detail)
            return
        if leg.session_reused():
            # A resumed session skipped chain verification (the trust bundle cannot have
            # changed: a new bundle means a new context with new ticket keys), but the
            # caller's leaf may have expired since its full handshake.
            if leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC):
                self._refuse(leg, "expired", f"{verdict.spiffe_id} resumed an expired session")
                return
            self.metrics.tls_resumed.labels("inbound").inc()
        own = self.catalog().services.get(self.service_key)
        allowed = own.policy.allowed_callers if own is not None else None
        if not caller_allowed(verdict.spiffe_id, allowed, self.trust_domain):
            self._refuse(
                leg, "caller_not_allowed", f"{verdict.spiffe_id} may not call {self.service_key}"
            )
            return
        if self.l7 is not None and leg.alpn_protocol() == ALPN_HTTP1:
            await self.l7(leg, verdict.spiffe_id)
            return
        if self.h2 is not None and leg.alpn_protocol() == ALPN_H2:
            await self.h2(leg, verdict.spiffe_id)
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(5.0):
                _, app = await loop.create_connection(PlainSide, *self.cfg.app_address)
        except (OSError, TimeoutError) as e:
            self.metrics.connect_errors.labels(self.service_key, "app_unreachable").inc()
            log.warning(
                "the app does not accept connections",
                extra={"port": self.cfg.app_port, "error": str(e)},
            )
            leg.refuse()  # the caller tries another endpoint and counts this one's failure
            return
        leg.accept()
        stats = RelayStats()
        holder: list[Open] = []

        def done(_: Relay) -> None:
            self.connections.discard(holder[0])
            self.metrics.connection_closed(
                "inbound", self.service_key, stats.bytes_a_to_b, stats.bytes_b_to_a
            )

        idle = own.policy.timeouts.idle_s if own is not None else 300.0
        relay = Relay(leg, app, idle_timeout_s=idle, stats=stats, on_done=done)
        holder.append(Open("inbound", self.service_key, relay, stats))
        self.connections.add(holder[0])
        self.metrics.opened.labels("inbound", self.service_key).inc()
        relay.start()
