"""One try of an outbound L7 request at one endpoint: a pooled connection to its
sidecar (through the circuit breaker), the request sent, the response head awaited,
and the outcome classified for ``sidecar.l7policy`` (connect failure, reset before
a response, per-try or request timeout, or an answer). Every try is reported once
to the balancer and the outlier detector.

For: ``Tries.run`` is called by ``sidecar.l7_outbound`` for each attempt; the retry
decision stays there. A pooled connection the peer closed just as it was taken (no
response byte) is replaced once by a fresh one for a replayable request, without
counting an attempt. ``discard`` reads away a response that will be retried.

Must never: give a connection back to the pool after a failed or abandoned try, or
count one try twice (or not at all) in the balancer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshlet.model import Endpoint
from meshlet.runtime import Clock
from sidecar.accesslog import ResponseFlag
from sidecar.breaker import Kind
from sidecar.clusters import Cluster, Clusters
from sidecar.connect import ConnectFailed, open_mtls
from sidecar.http1 import (
    BodyKind,
    EndOfMessage,
    HttpError,
    Request,
    RequestParser,
    Response,
    UpstreamHttpError,
)
from sidecar.l7_exchange import Body, Gone, send_rest
from sidecar.l7_io import Channel, next_event
from sidecar.l7_pool import Pool, UpstreamConn
from sidecar.l7_record import Record
from sidecar.l7_response import NoResponse, read_response_head
from sidecar.l7policy import ConnectFailure, Deadline, Outcome, ResetBeforeResponse, Timeout
from sidecar.metrics import SidecarMetrics

log = logging.getLogger(__name__)

DISCARD_LIMIT = 64 * 1024  # a retried response body up to this is read away (connection kept)


def pool_key(endpoint: Endpoint) -> tuple[str, str, int, str]:
    """The pool's key for an endpoint's sidecar: a changed address or identity is another
    peer, whose connections are not shared with the old one's."""
    return (endpoint.id, endpoint.address, endpoint.inbound_port, endpoint.identity)


class Overflow(Exception):
    """The circuit breaker refused: too many ``kind`` in flight."""

    def __init__(self, kind: Kind) -> None:
        super().__init__(kind.value)
        self.kind = kind


@dataclass(slots=True)
class Failure:
    """The try failed before any response byte: what to retry on, or to answer."""

    outcome: Outcome
    status: int
    flag: ResponseFlag
    text: str


@dataclass(slots=True)
class Answer:
    """A response head arrived; the rest is on ``conn``."""

    conn: UpstreamConn
    resp: Response


class Tries:
    def __init__(
        self,
        *,
        pool: Pool,
        clusters: Clusters,
        client_context: Callable[[], ssl.SSLContext],
        metrics: SidecarMetrics,
        clock: Clock,
    ) -> None:
        self.pool = pool
        self.clusters = clusters
        self.client_context = client_context
        self.metrics = metrics
        self.clock = clock

    async def connection(
        self, endpoint: Endpoint, cluster: Cluster, until: float | None, fresh: bool
    ) -> UpstreamConn:
        loop = asyncio.get_running_loop()
        breaker = cluster.breaker
        connect_s = cluster.service.policy.timeouts.connect_s
        if until is not None:
            connect_s = max(0.001, min(connect_s, until - loop.time()))

        async def connect() -> Any:
            if not breaker.try_acquire(Kind.PENDING):
                raise Overflow(Kind.PENDING)
            try:
                if not breaker.try_acquire(Kind.CONNECTIONS):
                    raise Overflow(Kind.CONNECTIONS)
                try:
                    ctx = self.client_context()
                    leg = await open_mtls(endpoint, ctx, connect_s)
                except BaseException:
                    breaker.release(Kind.CONNECTIONS)
                    raise
                leg.closed.add_done_callback(lambda _: breaker.release(Kind.CONNECTIONS))
                return leg
            finally:
                breaker.release(Kind.PENDING)

        return await self.pool.acquire(pool_key(endpoint), connect, fresh=fresh)

    async def run(
        self,
        down: Channel[RequestParser],
        req: Request,
        rec: Record,
        head: bytes,
        body: Body,
        until: float | None,
        deadline: Deadline,
        cluster: Cluster,
        endpoint: Endpoint,
        replayable: bool,
    ) -> Failure | Answer:
        """Send the request to ``endpoint`` (until the loop time ``until``) and read the
        response head; a pooled connection the peer had closed is replaced once, free.
        Raises ``Overflow`` (the breaker said no) and ``Gone`` (the client left)."""
        loop = asyncio.get_running_loop()
        waker = down.waker
        assert waker is not None
        self.clusters.starting(cluster, endpoint)
        started = loop.time()
        fresh = False
        key = pool_key(endpoint)
        while True:
            try:
                conn = None if fresh else self.pool.take_idle(key)
                if conn is None:
                    conn = await self.connection(endpoint, cluster, until, fresh)
            except ConnectFailed as e:
                self.metrics.connect_errors.labels(rec.service, e.reason).inc()
                self.answered(cluster, endpoint, None, False)
                if deadline.expired(self.clock):
                    return Failure(Timeout(per_try=False), 504, ResponseFlag.UPSTREAM_REQUEST_TIMEOUT,
                                    "upstream request timeout")  # fmt: skip
                return Failure(ConnectFailure(), 503, ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
                                f"upstream connect error ({e.reason})")  # fmt: skip
            except BaseException:
                cluster.balancer.on_finish(endpoint.id, None, True)
                raise
            reused = conn.exchanges > 0
            conn.begin(req.method, waker, upgrade=req.upgrade is not None)
            up = conn.channel
            up.write(head + body.encoded(req.body))
            timed_out = False
            try:
                if not body.complete:
                    rec.bytes_received = await send_rest(
                        up, down, req, body, until, cluster.service.policy.timeouts.idle_s
                    )
                resp = await read_response_head(up, down, until, forward_1xx=req.version == "1.1")
            except TimeoutError:  # the try's time ran out while the body was going up
                resp, timed_out = None, True
            except Gone:
                self.pool.discard(conn)
                cluster.balancer.on_finish(endpoint.id, None, True)
                raise
            except HttpError as e:
                self.pool.discard(conn)
                if not isinstance(e, UpstreamHttpError):  # the app's body was malformed
                    cluster.balancer.on_finish(endpoint.id, None, True)
                    raise Gone(f"malformed request body: {e.reason}") from None
                self.metrics.http_errors.labels("outbound", "upstream", "502").inc()
                self.answered(cluster, endpoint, None, False)
                return Failure(ResetBeforeResponse(), 502, ResponseFlag.UPSTREAM_PROTOCOL_ERROR,
                                e.reason)  # fmt: skip
            except (NoResponse, ConnectionError) as e:
                self.pool.discard(conn)
                fresh_ok = isinstance(e, NoResponse) and not e.any_bytes
                if reused and fresh_ok and replayable and not fresh:
                    self.metrics.pool_stale.labels("outbound", rec.service).inc()
                    fresh = True  # the peer closed it as we took it: not an attempt
                    continue
                self.answered(cluster, endpoint, None, False)
                return Failure(ResetBeforeResponse(), 503,
                                ResponseFlag.UPSTREAM_CONNECTION_TERMINATION,
                                f"upstream reset before response ({e})")  # fmt: skip
            if resp is None:
                self.pool.discard(conn)  # frees the upstream: its sidecar resets the app's
                if down.lost and not timed_out:
                    cluster.balancer.on_finish(endpoint.id, None, True)
                    raise Gone("the client left while the upstream was answering")
                self.answered(cluster, endpoint, None, False)
                flag = ResponseFlag.UPSTREAM_REQUEST_TIMEOUT
                if deadline.expired(self.clock):
                    return Failure(Timeout(per_try=False), 504, flag, "upstream request timeout")
                return Failure(Timeout(per_try=True), 504, flag, "upstream per-try timeout")
            latency = loop.time() - started
            rec.upstream_ms = int(latency * 1000)
            self.answered(cluster, endpoint, latency, resp.status < 500)
            return Answer(conn, resp)

    def answered(
        self, cluster: Cluster, endpoint: Endpoint, latency_s: float | None, ok: bool
    ) -> None:
        if self.clusters.answered(cluster, endpoint, latency_s, ok):
            self.metrics.ejections.labels(cluster.service.key).inc()
            log.warning(
                "endpoint ejected",
                extra={"service": cluster.service.key, "endpoint": endpoint.id},
            )

    async def discard(self, conn: UpstreamConn, resp: Response) -> None:
        """Read away a response that will be retried; keep the connection if that is quick."""
        if resp.body is BodyKind.UNTIL_CLOSE or (
            resp.body is BodyKind.LENGTH and (resp.content_length or 0) > DISCARD_LIMIT
        ):
            self.pool.discard(conn)
            return
        until = asyncio.get_running_loop().time() + 1.0
        try:
            while True:
                event = await next_event(conn.channel, until)
                if event is None:
                    self.pool.discard(conn)
                    return
                if isinstance(event, EndOfMessage):
                    self.pool.release(conn, resp.keep_alive)
                    return
        except HttpError:
            self.pool.discard(conn)
