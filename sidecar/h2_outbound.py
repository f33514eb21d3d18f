"""Outbound HTTP/2: the app's h2c connections to a mesh service port (gRPC, or h2c on an
``http`` port), each stream routed, balanced, retried and timed on its own, and carried
to the chosen endpoint's sidecar on a pooled h2 connection over mTLS (ALPN ``h2``), where
many streams share few connections.

For: ``serve`` runs one app connection (an ``H2Connection`` with the edge's limits:
floods end it with GOAWAY ENHANCE_YOUR_CALM before anything goes upstream; an idle one
is closed after the policy's idle timeout); each of its streams is an ``OutboundCall``
(``sidecar.h2_outbound_call``). ``H2Outbound`` holds what calls share: the pool of
connections to peer sidecars (``sidecar.h2_pool``; the dialler takes the circuit
breaker's pending and connection counts, like ``l7_attempt.Tries.connection``), the
per-service routes and retry budgets, metrics and the access log.

Must never: dial a peer without checking its identity (``connect.open_mtls`` does),
send h2 on a leg whose ALPN is not ``h2``, or let one connection's failure touch another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any

from meshlet.model import Endpoint, Service
from meshlet.runtime import Runtime
from sidecar.accesslog_sink import AccessLogSink
from sidecar.breaker import Kind
from sidecar.catalog import Catalog
from sidecar.clusters import Cluster, Clusters
from sidecar.connect import ConnectFailed, open_mtls
from sidecar.h2_call import close_when_idle, count_error
from sidecar.h2_limits import H2Limits
from sidecar.h2_outbound_call import OutboundCall
from sidecar.h2_pool import Dial, H2Pool
from sidecar.h2conn import H2Connection, H2Stream
from sidecar.identity import ALPN_H2, Contexts
from sidecar.l7_attempt import Overflow
from sidecar.l7_outbound import ServiceState
from sidecar.metrics import SidecarMetrics
from sidecar.relay import PlainSide, Side

MESH_IDLE_TIMEOUT_S = 60.0  # pooled h2 connections to peer sidecars with no stream this long


class H2Outbound:
    def __init__(
        self,
        *,
        catalog: Callable[[], Catalog],
        clusters: Clusters,
        contexts: Callable[[], Contexts],
        metrics: SidecarMetrics,
        runtime: Runtime,
        access_log: AccessLogSink,
        limits: H2Limits | None = None,
        pool: H2Pool | None = None,
        states: dict[str, ServiceState] | None = None,
    ) -> None:
        self.catalog = catalog
        self.clusters = clusters
        self.contexts = contexts
        self.metrics = metrics
        self.rt = runtime
        self.access_log = access_log
        self.limits = limits or H2Limits()  # the app-facing edge
        self.pool = pool or H2Pool(
            idle_timeout_s=MESH_IDLE_TIMEOUT_S, on_open=self._pool_open, on_close=self._pool_close
        )
        self._states: dict[str, ServiceState] = {} if states is None else states  # shared

    def close(self) -> None:
        self.pool.abort_all()

    # ---- one app connection ----------------------------------------------------------------

    async def serve(self, side: PlainSide, service: Service) -> None:
        loop = asyncio.get_running_loop()
        peer = side.peername
        client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "127.0.0.1"
        key = service.key

        def on_stream(down: H2Stream) -> None:
            call = OutboundCall(self, down, key, client_ip, loop)
            loop.call_soon(call.start)  # after the rest of this read: a reset in it wins

        conn = H2Connection(
            side, client=False, limits=self.limits, clock=self.rt.clock, on_stream=on_stream
        )
        conn.start()
        try:
            await close_when_idle(conn, service.policy.timeouts.idle_s)
        finally:
            if not conn.closed.done():
                conn.abort()
            count_error(self.metrics, "outbound", conn)

    def state(self, service: Service) -> ServiceState:
        st = self._states.get(service.key)
        if st is None:
            st = self._states[service.key] = ServiceState(service, self.rt)
        elif st.service is not service:
            st.adopt(service, self.rt)
        return st

    # ---- connections to peer sidecars -------------------------------------------------------

    def dialer(self, endpoint: Endpoint, cluster: Cluster) -> Dial:
        """Connect to ``endpoint``'s sidecar (h2 over mTLS), admitted by the breaker:
        one pending connect and one connection for as long as it is open."""
        breaker = cluster.breaker

        async def dial() -> Side:
            if not breaker.try_acquire(Kind.PENDING):
                raise Overflow(Kind.PENDING)
            try:
                if not breaker.try_acquire(Kind.CONNECTIONS):
                    raise Overflow(Kind.CONNECTIONS)
                try:
                    ctx = self.contexts().client_alpn[ALPN_H2]
                    leg = await open_mtls(endpoint, ctx, cluster.service.policy.timeouts.connect_s)
                except BaseException:
                    breaker.release(Kind.CONNECTIONS)
                    raise
                leg.closed.add_done_callback(lambda _: breaker.release(Kind.CONNECTIONS))
                if leg.alpn_protocol() != ALPN_H2:  # a peer that does not take h2
                    leg.abort()
                    raise ConnectFailed("alpn")
                return leg
            finally:
                breaker.release(Kind.PENDING)

        return dial

    def _pool_open(self, key: Hashable) -> None:
        service = _service_of(key)
        self.metrics.h2_pool_opened.labels("outbound", service).inc()
        self.metrics.h2_pool_connections.labels("outbound", service).inc()

    def _pool_close(self, key: Hashable) -> None:
        self.metrics.h2_pool_connections.labels("outbound", _service_of(key)).dec()


def _service_of(key: Any) -> str:
    return str(key[0]) if isinstance(key, tuple) else str(key)
