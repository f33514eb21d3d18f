"""Outbound L7: the app's HTTP/1.1 requests to a mesh service port whose protocol is
``http``, each routed, balanced, retried and timed on its own.

For: one task per app connection reads requests in order (keep-alive, pipelining,
``Connection: close``); per request: the route (``RouteTable``, rebuilt when the
policy's routes change), the circuit breaker (requests in flight; pending connects and
open connections in the pool), the backend subset by weight, an endpoint (outlier
detection, then the balancer, never one already tried), a pooled mTLS connection to
that endpoint's sidecar (``sidecar.l7_pool``, ALPN ``http/1.1``), and the response
streamed back with ``x-meshlet-attempts``. Failures before any response byte went
downstream are retried per ``sidecar.l7policy`` (connect failure, reset, 502/503/504;
idempotent methods and replayable bodies only; a new endpoint each time; backoff; the
service's retry budget). The request timeout answers 504 and resets that upstream
connection. Headers: ``x-request-id`` (added if absent), ``traceparent`` (continued
with a new span, or started), ``tracestate`` (passed on), ``x-forwarded-for``
(the app's address appended). One access log line and one response metric per request.

Must never: send a request again after any of its response reached the app, retry a
body it does not hold whole, or let a malformed request reach a peer (the codec
refuses it with its 4xx and the connection closes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshlet.model import Endpoint, Service
from meshlet.policy import Route
from meshlet.runtime import Runtime
from sidecar.accesslog import Direction, ResponseFlag
from sidecar.accesslog_sink import AccessLogSink
from sidecar.breaker import Kind
from sidecar.catalog import Catalog
from sidecar.clusters import Cluster, Clusters
from sidecar.http1 import (
    BodyKind,
    HttpError,
    Request,
    RequestParser,
)
from sidecar.identity import ALPN_HTTP1, Contexts
from sidecar.l7_attempt import Failure, Overflow, Tries
from sidecar.l7_exchange import (
    Gone,
    local_reply,
    no_body,
    read_body,
    request_head,
    serve_downstream,
)
from sidecar.l7_io import Channel, Waker
from sidecar.l7_pool import Pool
from sidecar.l7_record import (
    Record,
    finish,
    header_lookup,
    text,
)
from sidecar.l7_response import (
    respond,
)
from sidecar.l7policy import (
    ATTEMPTS_HEADER,
    Deadline,
    RetryState,
    Status,
    Timeout,
    is_idempotent,
)
from sidecar.metrics import SidecarMetrics
from sidecar.relay import PlainSide
from sidecar.retry_budget import RetryBudget
from sidecar.routing import RouteTable
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

log = logging.getLogger(__name__)

OVERFLOW_HEADER = b"x-meshlet-overflow"
HEADER_TIMEOUT_S = 10.0
# Set here, whatever the app sent: trace context, forwarding, the 100-continue we answer.
_REPLACED = frozenset({TRACEPARENT, TRACESTATE, X_FORWARDED_FOR, b"expect", ATTEMPTS_HEADER})
_REPLACED_AND_ID = _REPLACED | {REQUEST_ID}


class ServiceState:
    """Per upstream service: the compiled routes, the retry budget, subset keys. One per
    service for the HTTP/1.1 and HTTP/2 proxies together (``states=``), so retries of
    both count against the same budget."""

    __slots__ = ("budget", "keys", "service", "table")

    def __init__(self, service: Service, runtime: Runtime) -> None:
        self.service = service
        self.table = RouteTable.build(service)
        self.budget = RetryBudget(service.policy.retries.budget, runtime.clock)
        self.keys: dict[int, tuple[tuple[Endpoint, ...], tuple[str, ...]]] = {}

    def adopt(self, service: Service, runtime: Runtime) -> None:
        old = self.service.policy
        if service.policy.routes != old.routes:
            self.table = RouteTable.build(service)
        if service.policy.retries.budget != old.retries.budget:
            self.budget = RetryBudget(service.policy.retries.budget, runtime.clock)
        self.keys.clear()
        self.service = service

    def keys_of(self, subset: tuple[Endpoint, ...]) -> tuple[str, ...]:
        """The endpoint ids of a subset: the same tuple for the same subset object, so
        the outlier detector's cache holds."""
        hit = self.keys.get(id(subset))
        if hit is not None and hit[0] is subset:
            return hit[1]
        if len(self.keys) > 64:
            self.keys.clear()
        keys = tuple(e.id for e in subset)
        self.keys[id(subset)] = (subset, keys)
        return keys


def _bodiless(req: Request) -> bool:
    return req.body is BodyKind.NONE or (req.body is BodyKind.LENGTH and not req.content_length)


class L7Outbound:
    def __init__(
        self,
        *,
        catalog: Callable[[], Catalog],
        clusters: Clusters,
        contexts: Callable[[], Contexts],
        metrics: SidecarMetrics,
        runtime: Runtime,
        access_log: AccessLogSink,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        pool: Pool | None = None,
        states: dict[str, ServiceState] | None = None,
    ) -> None:
        self.catalog = catalog
        self.clusters = clusters
        self.contexts = contexts
        self.metrics = metrics
        self.rt = runtime
        self.access_log = access_log
        self.header_timeout_s = header_timeout_s
        self.pool = pool or Pool()
        self.tries = Tries(
            pool=self.pool,
            clusters=clusters,
            client_context=lambda: contexts().client_alpn[ALPN_HTTP1],
            metrics=metrics,
            clock=runtime.clock,
        )
        # Per upstream service; shared with the HTTP/2 proxy (one retry budget per service).
        self._states: dict[str, ServiceState] = {} if states is None else states

    def close(self) -> None:
        self.pool.abort_all()

    # ---- one app connection ------------------------------------------------------------------

    async def serve(self, side: PlainSide, service: Service) -> None:
        loop = asyncio.get_running_loop()
        down: Channel[RequestParser] = Channel(side, RequestParser(), Waker(loop))
        down.start()
        peer = side.peername
        client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "127.0.0.1"
        key = service.key

        def refused(e: HttpError) -> None:
            self.metrics.http_errors.labels("outbound", "downstream", str(e.status)).inc()
            rec = Record(Direction.OUTBOUND, key, self.rt.clock.now(), loop.time())
            rec.status, rec.flags = e.status, [ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR]
            finish(rec, self.metrics, self.access_log, loop.time())

        async def handle(req: Request) -> bool:
            return await self._request(down, req, key, client_ip)

        ended = await serve_downstream(
            down,
            handle,
            header_timeout_s=self.header_timeout_s,
            idle_timeout_s=service.policy.timeouts.idle_s,
            refused=refused,
        )
        if ended == "header_timeout":
            self.metrics.http_errors.labels("outbound", "downstream", "header_timeout").inc()

    def _state(self, service: Service, key: str) -> ServiceState:
        """``key`` is ``service.key`` (a property that formats it: the caller has it)."""
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = ServiceState(service, self.rt)
        elif st.service is not service:
            st.adopt(service, self.rt)
        return st

    # ---- one request ---------------------------------------------------------------------------

    async def _request(
        self, down: Channel[RequestParser], req: Request, key: str, client_ip: str
    ) -> bool:
        loop = asyncio.get_running_loop()
        rec = Record(Direction.OUTBOUND, key, self.rt.clock.now(), loop.time())
        lookup = header_lookup(req.headers)
        rec.of_request(req, lookup)
        try:
            return await self._route(down, req, lookup, rec, client_ip)
        except Gone:
            rec.flags.append(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
            raise
        finally:
            finish(rec, self.metrics, self.access_log, loop.time())

    def _reply(
        self,
        down: Channel[RequestParser],
        req: Request,
        rec: Record,
        status: int,
        message: str,
        flag: ResponseFlag | None,
        *,
        body_read: bool,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> bool:
        """The proxy's own answer; the connection stays open only if the request was
        read to its end (a bodiless one is, once its end is taken from the parser)."""
        if not body_read and _bodiless(req):
            down.parser.next_event()  # its EndOfMessage
            body_read = True
        keep = req.keep_alive and body_read
        if rec.attempts:
            headers = (*headers, (ATTEMPTS_HEADER, b"%d" % rec.attempts))
        down.write(local_reply(status, message, keep_alive=keep, headers=headers))
        rec.status = status
        if flag is not None:
            rec.flags.append(flag)
        return keep

    async def _route(
        self,
        down: Channel[RequestParser],
        req: Request,
        lookup: dict[bytes, bytes],
        rec: Record,
        client_ip: str,
    ) -> bool:
        catalog = self.catalog()
        service = catalog.services.get(rec.service)
        if service is None:
            self.metrics.http_request("outbound", rec.service, "-")
            msg = f"service {rec.service} is no longer in the mesh map"
            return self._reply(
                down, req, rec, 503, msg, ResponseFlag.NO_HEALTHY_UPSTREAM, body_read=False
            )
        st = self._state(service, rec.service)
        route = st.table.match(req.method, req.target, lookup)
        rec.route = route.name if route is not None else "-"
        self.metrics.http_request("outbound", rec.service, rec.route)
        if route is None:
            msg = f"no route of {rec.service} matches {req.method} {req.target}"
            return self._reply(
                down, req, rec, 404, msg, ResponseFlag.NO_ROUTE_FOUND, body_read=False
            )
        cluster = self.clusters.cluster(service, catalog)
        breaker = cluster.breaker
        if not breaker.try_acquire(Kind.REQUESTS):
            return self._overflow(down, req, rec, Kind.REQUESTS, body_read=False)
        try:
            return await self._forward(
                down, req, lookup, rec, client_ip, service, st, route, cluster
            )
        finally:
            breaker.release(Kind.REQUESTS)

    def _overflow(
        self,
        down: Channel[RequestParser],
        req: Request,
        rec: Record,
        kind: Kind,
        *,
        body_read: bool,
    ) -> bool:
        self.metrics.overflows.labels(rec.service, kind.value).inc()
        msg = f"circuit breaker open: too many {kind.value} to {rec.service}"
        headers = ((OVERFLOW_HEADER, kind.value.encode()),)
        flag = ResponseFlag.UPSTREAM_OVERFLOW
        return self._reply(down, req, rec, 503, msg, flag, body_read=body_read, headers=headers)

    async def _forward(
        self,
        down: Channel[RequestParser],
        req: Request,
        lookup: dict[bytes, bytes],
        rec: Record,
        client_ip: str,
        service: Service,
        st: ServiceState,
        route: Route,
        cluster: Cluster,
    ) -> bool:
        loop = asyncio.get_running_loop()
        clock, rng = self.rt.clock, self.rt.rng
        policy = service.policy
        deadline = Deadline.start(
            clock, route_timeout_s=route.timeout_s, request_timeout_s=policy.timeouts.request_s
        )
        request_id, added = ensure_request_id(lookup, rng)
        incoming = Traceparent.parse(lookup.get(TRACEPARENT))
        outgoing = next_hop(incoming, rng)
        tracestate = tracestate_to_forward(incoming, lookup.get(TRACESTATE))
        xff = x_forwarded_for(lookup.get(X_FORWARDED_FOR), client_ip)
        add = [(TRACEPARENT, outgoing.format()), (X_FORWARDED_FOR, xff)]
        if tracestate is not None:
            add.append((TRACESTATE, tracestate))
        if added:
            add.append((REQUEST_ID, request_id))
        rec.request_id, rec.trace_id = text(request_id), outgoing.trace_id
        rec.x_forwarded_for = text(xff)
        head = request_head(req, add, _REPLACED_AND_ID if added else _REPLACED)
        if req.body is BodyKind.NONE:  # the common GET: its end is already parsed
            body = no_body(down)
        else:
            try:
                body = await read_body(
                    down, req, policy.retries.max_body_bytes, policy.timeouts.idle_s
                )
            except HttpError as e:  # a malformed body: answered, and the connection closes
                self.metrics.http_errors.labels("outbound", "downstream", str(e.status)).inc()
                flag = ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR
                self._reply(down, req, rec, e.status, e.reason, flag, body_read=False)
                return False
        if body.complete:
            rec.bytes_received = body.size
            body_size: int | None = body.size
        else:
            body_size = req.content_length if req.body is BodyKind.LENGTH else None
        state = RetryState(
            policy.retries, st.budget, clock, rng, method=req.method, body_size=body_size,
            deadline=deadline,
        )  # fmt: skip
        hash_header = policy.balancing.hash_header
        hash_key = lookup.get(hash_header.lower().encode()) if hash_header else None
        replayable = body.complete and (policy.retries.non_idempotent or is_idempotent(req.method))
        while True:
            endpoints = self.catalog().endpoints(service)
            subset = st.table.select_backend(route, endpoints, rng)
            keys = st.keys_of(subset) if subset else ()
            choice = self.clusters.choose(cluster, state.tried, among=keys, hash_key=hash_key)
            if choice.endpoint is None and state.tried and keys:
                choice = self.clusters.choose(cluster, among=keys, hash_key=hash_key)
            if choice.panic:
                self.metrics.panic.labels(rec.service).inc()
            endpoint = choice.endpoint
            if endpoint is None:
                self.metrics.no_endpoint.labels(rec.service).inc()
                msg = f"no healthy endpoint of {rec.service} for route {rec.route}"
                flag = ResponseFlag.NO_HEALTHY_UPSTREAM
                return self._reply(down, req, rec, 503, msg, flag, body_read=body.complete)
            state.tried.add(endpoint.id)
            rec.attempts = state.attempts
            rec.upstream_host = f"{endpoint.address}:{endpoint.inbound_port}"
            rec.destination_identity = endpoint.identity
            timeout = state.try_timeout_s()
            until = None if timeout is None else loop.time() + timeout
            try:
                result = await self.tries.run(down, req, rec, head, body, until, deadline,
                                              cluster, endpoint, replayable)  # fmt: skip
            except Overflow as o:
                return self._overflow(down, req, rec, o.kind, body_read=body.complete)
            if isinstance(result, Failure):
                decision = state.may_retry(result.outcome)
                if decision.retry:
                    self.metrics.retries.labels(rec.service, rec.route).inc()
                    await self._sleep(down, decision.backoff_s)
                    continue
                if decision.limit_reached:
                    rec.flags.append(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
                    self.metrics.retries_skipped.labels(rec.service, decision.reason.value).inc()
                if isinstance(result.outcome, Timeout):
                    self.metrics.timeouts.labels("outbound", rec.service, rec.route).inc()
                return self._reply(
                    down, req, rec, result.status, result.text, result.flag, body_read=body.complete
                )
            resp = result.resp
            if resp.status in policy.retries.on_statuses:
                decision = state.may_retry(Status(resp.status))
                if decision.retry:
                    self.metrics.retries.labels(rec.service, rec.route).inc()
                    await self.tries.discard(result.conn, resp)
                    await self._sleep(down, decision.backoff_s)
                    continue
                if decision.limit_reached:
                    rec.flags.append(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
                    self.metrics.retries_skipped.labels(rec.service, decision.reason.value).inc()
            rec.attempts = state.attempts
            attempts = ((ATTEMPTS_HEADER, b"%d" % state.attempts),)
            return await respond(
                self.pool, down, req, rec, result.conn, resp, attempts, policy.timeouts.idle_s
            )

    async def _sleep(self, down: Channel[RequestParser], seconds: float) -> None:
        """The backoff before a retry; ``Gone`` if the app leaves meanwhile."""
        waker = down.waker
        assert waker is not None
        end = asyncio.get_running_loop().time() + seconds
        while not down.lost:
            if not await waker.wait(end):
                return
        raise Gone("the client left during a retry backoff")
