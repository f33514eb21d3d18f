"""One stream of an app's h2c connection, through the outbound sidecar: route, circuit
breaker, deadline, endpoint, a stream on a pooled connection to that endpoint's
sidecar, the response back; retried on another endpoint while nothing went downstream.

For: ``OutboundCall.start`` (scheduled by ``sidecar.h2_outbound`` right after the stream
arrived) routes the request (``RouteTable`` on the path without its query; no route:
404, gRPC UNIMPLEMENTED), takes a REQUESTS unit of the breaker (overflow: 503 at once
with ``x-meshlet-overflow``, gRPC UNAVAILABLE), starts the deadlines and the trace
headers (``x-request-id`` if absent, ``traceparent`` next hop, ``tracestate``,
``x-forwarded-for``) and places tries, each exactly as ``L7Outbound._forward`` picks its
endpoint (the route's weighted subset, outlier detection and the balancer, never an
endpoint already tried, ``hash_header``), on a pooled connection or a new one (connects
are shared per endpoint, ``sidecar.h2_pool``). What a try's outcome leads to (a retry,
the response, an answer of ours) is ``sidecar.h2_outbound_retry``.

Deadlines: the route's (else the policy's) request timeout runs until the response
head, as for HTTP/1.1; a gRPC call's ``grpc-timeout`` covers the whole call and is sent
upstream as the time left on each try (only the caller's own: the route timeout ends at
the head, so it is no deadline for the server). Before the head an expiry answers 504
(gRPC: trailers-only DEADLINE_EXCEEDED) and resets the upstream stream (CANCEL), so the
app there sees the cancellation; after the head (gRPC) the client gets trailers with
DEADLINE_EXCEEDED and the upstream stream is reset.

Must never: send a request again once any of its response went downstream, replay a
body it does not hold whole, or leave a try's connect or timer acting on a later try.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Hashable
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from meshlet.model import Service
from meshlet.policy import Route
from sidecar.accesslog import Direction, ResponseFlag
from sidecar.breaker import Breaker, Kind
from sidecar.connect import ConnectFailed
from sidecar.h2_call import Try, new_record
from sidecar.h2_headers import (
    GRPC_TIMEOUT,
    Headers,
    RequestHead,
    forwarded,
)
from sidecar.h2_outbound_retry import RetryingCall
from sidecar.h2_pool import MAX_ROUNDS
from sidecar.h2conn import H2Connection, H2Stream
from sidecar.l7_attempt import Overflow
from sidecar.l7_outbound import ServiceState
from sidecar.l7_record import Record, text
from sidecar.l7policy import (
    ATTEMPTS_HEADER,
    NO_DEADLINE,
    ConnectFailure,
    Deadline,
    ResetBeforeResponse,
    RetryState,
    Timeout,
)
from sidecar.trace import (
    REQUEST_ID,
    TRACEPARENT,
    TRACESTATE,
    X_FORWARDED_FOR,
    Traceparent,
    ensure_request_id,
    next_hop,
    tracestate_to_forward,
    x_forwarded_for,
)

if TYPE_CHECKING:
    from sidecar.h2_outbound import H2Outbound

log = logging.getLogger(__name__)

DEFAULT_COPY = 64 * 1024  # until the policy is known (start): bytes before it are kept anyway
_EXPIRED_WITHIN_S = 0.002  # a try timer that fires this close to the deadline is the deadline
# Set here, whatever the app sent (grpc-timeout: rewritten for gRPC, see the docstring).
_REPLACED = frozenset({TRACEPARENT, TRACESTATE, X_FORWARDED_FOR, ATTEMPTS_HEADER})
_DROP = {
    (grpc, added): _REPLACED
    | ({GRPC_TIMEOUT} if grpc else set())
    | ({REQUEST_ID} if added else set())
    for grpc in (False, True)
    for added in (False, True)
}


class OutboundCall(RetryingCall):
    """See the module docstring."""

    __slots__ = ("client_ip", "hash_key", "route", "st", "up_headers")
    # Set in ``start`` (read only after it ran), with the parent's service, cluster, state:
    st: ServiceState
    route: Route
    hash_key: bytes | None
    up_headers: Headers

    def __init__(
        self,
        owner: H2Outbound,
        down: H2Stream,
        service_key: str,
        client_ip: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        head = RequestHead.parse(down.headers or [])
        rec = Record(Direction.OUTBOUND, service_key, owner.rt.clock.now(), loop.time())
        super().__init__(
            down,
            new_record(rec, head),
            head,
            copy_limit=DEFAULT_COPY,
            metrics=owner.metrics,
            sink=owner.access_log,
            loop=loop,
        )
        self.owner = owner
        self.client_ip = client_ip
        self.breaker: Breaker | None = None
        self.deadline = NO_DEADLINE
        self.call_deadline = NO_DEADLINE

    # -- routing and admission ---------------------------------------------------------------

    def start(self) -> None:
        if self.finished:
            return  # the client reset it at once
        o, rec, head = self.owner, self.rec, self.head
        catalog = o.catalog()
        service = catalog.services.get(rec.service)
        if service is None:
            o.metrics.http_request("outbound", rec.service, "-")
            msg = f"service {rec.service} is no longer in the mesh map"
            self.reply(503, msg, ResponseFlag.NO_HEALTHY_UPSTREAM)
            return
        st = o.state(service)
        route = st.table.match(head.method, head.path, head.lookup)
        rec.route = route.name if route is not None else "-"
        o.metrics.http_request("outbound", rec.service, rec.route)
        if route is None:
            msg = f"no route of {rec.service} matches {head.method} {head.path}"
            self.reply(404, msg, ResponseFlag.NO_ROUTE_FOUND)
            return
        cluster = o.clusters.cluster(service, catalog)
        if not cluster.breaker.try_acquire(Kind.REQUESTS):
            self._overflow(Kind.REQUESTS)
            return
        self.breaker = cluster.breaker
        self.service, self.st, self.route, self.cluster = service, st, route, cluster
        self._prepare(service, route)
        self._next_try()

    def _prepare(self, service: Service, route: Route) -> None:
        """Deadlines, trace headers, the upstream head, the retry state."""
        clock, rng = self.owner.rt.clock, self.owner.rt.rng
        policy, lookup, rec = service.policy, self.head.lookup, self.rec
        self.copy_limit = policy.retries.max_body_bytes
        grpc_timeout = lookup.get(GRPC_TIMEOUT) if self.grpc else None
        self.deadline = Deadline.start(
            clock,
            route_timeout_s=route.timeout_s,
            request_timeout_s=policy.timeouts.request_s,
            grpc_timeout=grpc_timeout,
        )
        if grpc_timeout is not None:
            self.call_deadline = Deadline.start(clock, grpc_timeout=grpc_timeout)
        request_id, added = ensure_request_id(lookup, rng)
        incoming = Traceparent.parse(lookup.get(TRACEPARENT))
        outgoing = next_hop(incoming, rng)
        tracestate = tracestate_to_forward(incoming, lookup.get(TRACESTATE))
        xff = x_forwarded_for(lookup.get(X_FORWARDED_FOR), self.client_ip)
        add = [(TRACEPARENT, outgoing.format()), (X_FORWARDED_FOR, xff)]
        if tracestate is not None:
            add.append((TRACESTATE, tracestate))
        if added:
            add.append((REQUEST_ID, request_id))
        rec.request_id, rec.trace_id = text(request_id), outgoing.trace_id
        rec.x_forwarded_for = text(xff)
        self.up_headers = forwarded(self.down.headers or [], _DROP[self.grpc, added], add)
        self.state = RetryState(
            policy.retries, self.st.budget, clock, rng, method=self.head.method, body_size=0,
            grpc=self.grpc, deadline=self.deadline,
        )  # fmt: skip
        hash_header = policy.balancing.hash_header
        self.hash_key = lookup.get(hash_header.lower().encode()) if hash_header else None

    # -- tries -------------------------------------------------------------------------------

    def _next_try(self) -> None:
        self.timer = None
        if self.finished:
            return
        o, rec, state, cluster = self.owner, self.rec, self.state, self.cluster
        rng = o.rt.rng
        subset = self.st.table.select_backend(self.route, o.catalog().endpoints(self.service), rng)
        keys = self.st.keys_of(subset) if subset else ()
        choice = o.clusters.choose(cluster, state.tried, among=keys, hash_key=self.hash_key)
        if choice.endpoint is None and state.tried and keys:
            choice = o.clusters.choose(cluster, among=keys, hash_key=self.hash_key)
        if choice.panic:
            o.metrics.panic.labels(rec.service).inc()
        ep = choice.endpoint
        if ep is None:
            o.metrics.no_endpoint.labels(rec.service).inc()
            msg = f"no healthy endpoint of {rec.service} for route {rec.route}"
            self._answer(503, msg, ResponseFlag.NO_HEALTHY_UPSTREAM)
            return
        state.tried.add(ep.id)
        rec.attempts = state.attempts
        rec.upstream_host = f"{ep.address}:{ep.inbound_port}"
        rec.destination_identity = ep.identity
        o.clusters.starting(cluster, ep)
        t = Try(self, self.loop.time(), ep)
        self.try_ = t
        timeout = state.try_timeout_s()
        if timeout is not None:
            self.timer = self.loop.call_later(timeout, self._try_timeout, t)
        key = (rec.service, ep.id, ep.address, ep.inbound_port, ep.identity)
        conn = o.pool.ready(key)
        if conn is not None:
            self._open(t, conn)
        else:
            self._connect(t, key, 0)

    def _connect(self, t: Try, key: Hashable, rounds: int) -> None:
        assert t.endpoint is not None
        fut = self.owner.pool.connect(key, self.owner.dialer(t.endpoint, self.cluster))
        fut.add_done_callback(functools.partial(self._connected, t, key, rounds))

    def _connected(
        self, t: Try, key: Hashable, rounds: int, fut: asyncio.Future[H2Connection]
    ) -> None:
        exc = ConnectFailed("cancelled") if fut.cancelled() else fut.exception()
        if t is not self.try_:
            return  # timed out, or the client left, meanwhile
        if exc is not None:
            self._connect_failed(t, exc)
            return
        conn = self.owner.pool.ready(key)
        if conn is not None:
            self._open(t, conn)
        elif rounds + 1 < MAX_ROUNDS:
            self._connect(t, key, rounds + 1)  # the new one filled up at once: another
        else:
            self._connect_failed(t, ConnectFailed("no_stream_slot"))

    def _connect_failed(self, t: Try, exc: BaseException) -> None:
        o, rec = self.owner, self.rec
        assert t.endpoint is not None
        self.try_ = None
        self.cancel_timer()
        if isinstance(exc, Overflow):
            t.reported = True
            self.cluster.balancer.on_finish(t.endpoint.id, None, True)
            self._overflow(exc.kind)
            return
        if isinstance(exc, ConnectFailed):
            reason = exc.reason
        else:
            reason = "connect_error"
            log.warning("connect to %s failed: %r", rec.upstream_host, exc)
        o.metrics.connect_errors.labels(rec.service, reason).inc()
        self._report(t, None, False)
        if self.deadline.expired(o.rt.clock):
            self._failed(
                Timeout(per_try=False), 504, ResponseFlag.UPSTREAM_REQUEST_TIMEOUT,
                "upstream request timeout",
            )  # fmt: skip
        else:
            self._failed(
                ConnectFailure(), 503, ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
                f"upstream connect error ({reason})",
            )  # fmt: skip

    def _open(self, t: Try, conn: H2Connection) -> None:
        headers = self.up_headers
        left = self.call_deadline.grpc_timeout(self.owner.rt.clock)
        if left is not None:
            headers = [*headers, (GRPC_TIMEOUT, left.encode())]
        if not self.open_try(t, conn, headers):
            self.try_ = None
            self.cancel_timer()
            self._report(t, None, False)
            self._failed(
                ResetBeforeResponse(refused_stream=True), 502, ResponseFlag.UPSTREAM_PROTOCOL_ERROR,
                "cannot open an upstream HTTP/2 stream",
            )  # fmt: skip

    def _try_timeout(self, t: Try) -> None:
        self.timer = None
        if t is not self.try_:
            return
        self.try_ = None
        if t.up is not None:
            t.up.reset(ErrorCodes.CANCEL)  # the upstream app sees the cancellation
        self._report(t, None, False)
        left = self.deadline.remaining(self.owner.rt.clock)
        if left is not None and left < _EXPIRED_WITHIN_S:
            outcome, msg = Timeout(per_try=False), "upstream request timeout"
        else:
            outcome, msg = Timeout(per_try=True), "upstream per-try timeout"
        self._failed(outcome, 504, ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, msg)
