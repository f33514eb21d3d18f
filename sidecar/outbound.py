"""Outbound: the app's connections to mesh services, over mutual TLS to a peer sidecar.

Transparent mode has one listener (15001): SO_ORIGINAL_DST gives the VIP:port the app
dialled. Explicit mode has one local listener per ``--upstream``. For each connection:
the breaker admits it or it is reset at once; an endpoint is chosen (outlier rules,
then the balancer); connect + TLS handshake with a timeout; the peer must present
exactly the SPIFFE ID the control plane lists for that endpoint; a failure tries
another endpoint (bounded) before the app sees a reset. Then the relay takes over.

Which handler serves a connection follows the dialled service port's protocol: ``tcp``
stays on the relay, untouched; ``grpc`` goes to the HTTP/2 handler (``h2``); ``http``
goes to the HTTP/1.1 handler (``l7``, ``sidecar.l7_outbound``: per-request routing,
balancing and retries over pooled connections) unless its first bytes are the HTTP/2
preface (h2c: ``h2``). A port not declared (``auto``, the default) is detected: the
first bytes are peeked (``sidecar.peek``, ``sidecar.detect``) for up to
``--detect-timeout``; an HTTP/1 request line goes to ``l7``, the preface to ``h2``, and
anything else, or silence (a server-speaks-first protocol), to the relay, peeked bytes
first. A handler not wired in (None) leaves its connections on the relay.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from meshlet.model import Endpoint, Protocol, Service
from sidecar.breaker import Kind
from sidecar.catalog import Catalog
from sidecar.clusters import Cluster, Clusters
from sidecar.config import SidecarConfig, UnknownDestination, Upstream
from sidecar.connect import ConnectFailed, SessionCache, open_mtls
from sidecar.detect import Detected, classify, h2_or_http1
from sidecar.identity import Contexts
from sidecar.metrics import DetectionMetrics, SidecarMetrics
from sidecar.origdst import original_dst
from sidecar.peek import peek
from sidecar.relay import PlainSide, Relay, RelayStats
from sidecar.tlsleg import TlsLeg

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)  # compared and hashed by identity: a member of a set
class Open:
    """A relayed connection, for metrics and draining."""

    direction: str
    service: str
    relay: Relay
    stats: RelayStats


class Outbound:
    def __init__(
        self,
        cfg: SidecarConfig,
        *,
        catalog: Callable[[], Catalog],
        clusters: Clusters,
        contexts: Callable[[], Contexts],
        metrics: SidecarMetrics,
        connections: set[Open],
        l7: Callable[[PlainSide, Service], Awaitable[None]] | None = None,
        h2: Callable[[PlainSide, Service], Awaitable[None]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.l7 = l7
        self.h2 = h2
        self.catalog = catalog
        self.clusters = clusters
        self.contexts = contexts
        self.metrics = metrics
        self.detection = DetectionMetrics(metrics.registry)
        self.connections = connections
        self.servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.sessions = SessionCache()  # TLS sessions to resume, per endpoint and context

    # ---- listeners -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.cfg.mode.value == "transparent":
            host, port = self.cfg.outbound
            self.servers.append(
                await loop.create_server(
                    lambda: self._accepted(None), host, port, reuse_address=True
                )
            )
        for up in self.cfg.upstreams:
            self.servers.append(
                await loop.create_server(
                    functools.partial(self._accepted, up),
                    up.listen[0],
                    up.listen[1],
                    reuse_address=True,
                )
            )

    def bound(self) -> list[tuple[str, int]]:
        return [s.sockets[0].getsockname()[:2] for s in self.servers if s.sockets]

    async def stop(self) -> None:
        for s in self.servers:
            s.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accepted(self, upstream: Upstream | None) -> PlainSide:
        side = PlainSide()
        loop = asyncio.get_running_loop()

        def made() -> None:
            task = loop.create_task(self._serve_guarded(side, upstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        loop.call_soon(made)
        return side

    # ---- one connection ----------------------------------------------------------------------

    def _destination(
        self, side: PlainSide, upstream: Upstream | None
    ) -> tuple[Service | None, tuple[str, int] | None]:
        catalog = self.catalog()
        if upstream is not None:
            svc = catalog.service(upstream.namespace, upstream.name)
            return svc, None
        sock = side.sock
        if sock is None:
            return None, None
        dst = original_dst(sock)
        return catalog.service_at(dst[0], dst[1]), dst

    async def _serve_guarded(self, side: PlainSide, upstream: Upstream | None) -> None:
        """A bug in one connection resets that connection, logged; it never leaves it hanging."""
        try:
            await self._serve(side, upstream)
        except asyncio.CancelledError:
            side.abort()
            raise
        except Exception:
            log.exception("outbound connection failed")
            side.abort()

    async def _serve(self, side: PlainSide, upstream: Upstream | None) -> None:
        if side.transport is None or side.transport.is_closing():
            return
        try:
            service, dst = self._destination(side, upstream)
        except Exception as e:  # a socket that vanished, or no original destination
            log.info("outbound connection without a destination", extra={"error": str(e)})
            side.abort()
            return
        if service is None:
            await self._unknown(side, upstream, dst)
            return
        found = await self._detect(side, service, _port_protocol(service, upstream, dst))
        if found is None:  # the app's connection went away while we looked at it
            side.abort()
            return
        if found is Detected.HTTP1 and self.l7 is not None:
            await self.l7(side, service)
            return
        if found is Detected.H2 and self.h2 is not None:
            await self.h2(side, service)
            return
        catalog = self.catalog()
        cluster = self.clusters.cluster(service, catalog)
        if not cluster.breaker.try_acquire(Kind.CONNECTIONS):
            self.metrics.overflows.labels(service.key, "connections").inc()
            side.abort()
            return
        try:
            await self._connect_and_relay(side, cluster, service)
        except BaseException:
            cluster.breaker.release(Kind.CONNECTIONS)
            raise

    async def _detect(
        self, side: PlainSide, service: Service, protocol: Protocol
    ) -> Detected | None:
        """What the connection speaks: declared, or peeked at (the bytes stay on ``side``);
        None if it was lost meanwhile."""
        if protocol is Protocol.TCP:
            return Detected.TCP
        if protocol is Protocol.GRPC:
            return Detected.H2
        declared_http = protocol is Protocol.HTTP
        if declared_http:  # only h2c or not; the HTTP/1.1 codec judges the rest
            peeked = await peek(side, h2_or_http1, self.cfg.http_header_timeout_s)
        else:
            peeked = await peek(side, classify, self.cfg.detect_timeout_s)
        if peeked.lost:
            return None
        found = peeked.found
        if found is Detected.NEED_MORE:  # silence, or EOF before anything decisive
            found = Detected.HTTP1 if declared_http else Detected.TCP
        outcome = "timeout" if peeked.timed_out else found.value
        self.detection.detected(service.key, outcome, peeked.seconds)
        return found

    async def _connect_and_relay(self, side: PlainSide, cluster: Cluster, service: Service) -> None:
        tried: set[str] = set()
        for _ in range(self.cfg.connect_attempts):
            choice = self.clusters.choose(cluster, exclude=tried)
            if choice.panic:
                self.metrics.panic.labels(service.key).inc()
            endpoint = choice.endpoint
            if endpoint is None:
                break
            tried.add(endpoint.id)
            if not cluster.breaker.try_acquire(Kind.PENDING):
                self.metrics.overflows.labels(service.key, "pending").inc()
                break
            self.clusters.starting(cluster, endpoint)
            started = time.monotonic()
            try:
                leg = await self._open(endpoint, service)
            except ConnectFailed as e:
                self.metrics.connect_errors.labels(service.key, e.reason).inc()
                if self.clusters.failed(cluster, endpoint):
                    self.metrics.ejections.labels(service.key).inc()
                    log.warning(
                        "endpoint ejected",
                        extra={"service": service.key, "endpoint": endpoint.id, "reason": e.reason},
                    )
                continue
            finally:
                cluster.breaker.release(Kind.PENDING)
            self.clusters.connected(cluster, endpoint, time.monotonic() - started)
            if side.transport is None or side.transport.is_closing():
                leg.abort()
                self.clusters.finished(cluster, endpoint)
                cluster.breaker.release(Kind.CONNECTIONS)
                return
            self._relay(
                side, leg, "outbound", service.key, functools.partial(self._done, cluster, endpoint)
            )
            return
        self.metrics.no_endpoint.labels(service.key).inc()
        side.abort()
        cluster.breaker.release(Kind.CONNECTIONS)

    def _done(self, cluster: Cluster, endpoint: Endpoint) -> None:
        self.clusters.finished(cluster, endpoint)
        cluster.breaker.release(Kind.CONNECTIONS)

    async def _open(self, endpoint: Endpoint, service: Service) -> TlsLeg:
        leg = await open_mtls(
            endpoint,
            self.contexts().client,
            service.policy.timeouts.connect_s,
            sessions=self.sessions,
        )
        if leg.session_reused():
            self.metrics.tls_resumed.labels("outbound").inc()
        return leg

    def _relay(
        self,
        a: PlainSide | TlsLeg,
        b: PlainSide | TlsLeg,
        direction: str,
        service: str,
        finished: Callable[[], None],
    ) -> None:
        stats = RelayStats()
        holder: list[Open] = []

        def done(_: Relay) -> None:
            self.connections.discard(holder[0])
            self.metrics.connection_closed(
                direction, service, stats.bytes_a_to_b, stats.bytes_b_to_a
            )
            finished()

        relay = Relay(a, b, idle_timeout_s=self._idle(service), stats=stats, on_done=done)
        holder.append(Open(direction, service, relay, stats))
        self.connections.add(holder[0])
        self.metrics.opened.labels(direction, service).inc()
        relay.start()

    def _idle(self, service_key: str) -> float:
        cluster = self.clusters.by_service.get(service_key)
        return cluster.service.policy.timeouts.idle_s if cluster else 300.0

    def _loops_back(self, dst: tuple[str, int]) -> bool:
        bound = self.bound()
        if dst[1] not in {port for _, port in bound}:
            return False
        try:
            loopback = ipaddress.ip_address(dst[0]).is_loopback
        except ValueError:
            return False
        return (
            loopback
            or dst[0] == self.cfg.address
            or any(host in (dst[0], "0.0.0.0", "::") for host, _ in bound)
        )

    async def _unknown(
        self, side: PlainSide, upstream: Upstream | None, dst: tuple[str, int] | None
    ) -> None:
        if upstream is not None:
            log.warning(
                "upstream service is not in the mesh map", extra={"service": upstream.service_key}
            )
            self.metrics.no_endpoint.labels(upstream.service_key).inc()
            side.abort()
            return
        if dst is None or self.cfg.unknown_destination is UnknownDestination.REJECT:
            self.metrics.unknown_destination.labels("reject").inc()
            side.abort()
            return
        if self._loops_back(dst):  # dialled our own listener directly: passing it on would loop
            self.metrics.unknown_destination.labels("loop").inc()
            side.abort()
            return
        if any(vip == dst[0] for vip, _ in self.catalog().by_vip):
            # A VIP on a port its service does not declare: nobody else owns the address,
            # so say so now instead of letting the app wait out a connect timeout.
            log.info(
                "connection to an undeclared port of a VIP",
                extra={"destination": f"{dst[0]}:{dst[1]}"},
            )
            self.metrics.unknown_destination.labels("undeclared_port").inc()
            side.abort()
            return
        self.metrics.unknown_destination.labels("pass").inc()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(5.0):
                sock = socket.socket(
                    socket.AF_INET6 if ":" in dst[0] else socket.AF_INET, socket.SOCK_STREAM
                )
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.cfg.proxy_mark)
                sock.setblocking(False)
                await loop.sock_connect(sock, dst)
                _, peer = await loop.create_connection(PlainSide, sock=sock)
        except (OSError, TimeoutError):
            side.abort()
            return
        self._relay(side, peer, "outbound", "passthrough", lambda: None)


def _port_protocol(
    service: Service, upstream: Upstream | None, dst: tuple[str, int] | None
) -> Protocol:
    """The declared protocol of the service port the app dialled; ``auto`` (detect) for
    a port the service does not list (an explicit ``--upstream`` may name one)."""
    number = upstream.port if upstream is not None else dst[1] if dst is not None else None
    port = service.port(number) if number is not None else None
    return port.protocol if port is not None else Protocol.AUTO
