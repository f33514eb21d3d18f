"""Inbound HTTP/2: h2 from peer sidecars (the mTLS leg negotiated ALPN ``h2``), each stream
forwarded to the app over a small pool of multiplexed h2c connections to
``app_host:app_port``.

For: the caller passed the identity and policy checks already (``sidecar.inbound``);
its connection gets the edge's HTTP/2 limits plus room for the fields the calling
sidecar adds (``l7_inbound.MESH_FIELDS``), so whatever passed the outbound passes here
and nothing over the limits reaches the app. Per stream: ``traceparent`` continued
with this hop's span id, ``x-request-id`` kept (made only if a caller sent none), the
rest passed as it came, frames spliced both ways (``sidecar.h2_call``), one access log
line and one response metric with ``direction=inbound`` and the caller's identity. No
retries and no timeouts of its own (the calling sidecar decides, and resets the stream
when it gives up: the app's stream is reset with it); only a stream the app refused
(REFUSED_STREAM, or above its GOAWAY: never processed) or one lost with a pooled app
connection that had served before goes again, once, while its body is held. An app
that resets a stream before answering has the reset passed on to the caller. Draining
(SIGTERM): GOAWAY to every caller, open streams may finish within the grace period.

Must never: forward a stream before its caller was checked, or answer for the app what
the app did not say (its resets cross as resets).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Hashable

from h2.errors import ErrorCodes

from certs.spiffe import SpiffeId
from meshlet.runtime import Runtime
from sidecar.accesslog import Direction, ResponseFlag
from sidecar.accesslog_sink import AccessLogSink
from sidecar.catalog import Catalog
from sidecar.config import SidecarConfig
from sidecar.h2_call import Call, Try, close_when_idle, count_error, new_record
from sidecar.h2_headers import Headers, RequestHead, forwarded
from sidecar.h2_limits import H2Limits
from sidecar.h2_pool import MAX_ROUNDS, H2Pool
from sidecar.h2conn import H2Connection, H2Stream
from sidecar.l7_inbound import APP_CONNECT_TIMEOUT_S, MAX_BODY_HELD, MESH_FIELD_BYTES, MESH_FIELDS
from sidecar.l7_record import Record, text
from sidecar.metrics import SidecarMetrics
from sidecar.relay import PlainSide, Side
from sidecar.tlsleg import TlsLeg
from sidecar.trace import REQUEST_ID, TRACEPARENT, Traceparent, ensure_request_id, next_hop

log = logging.getLogger(__name__)

# h2c connections to the app with no stream this long are closed. An HTTP/2 server that
# closes an idle connection says so with a GOAWAY first, so the race HTTP/1.1 pools know
# is rare here: a longer timeout than l7_inbound's costs nothing.
APP_IDLE_TIMEOUT_S = 30.0
MESH_LIMITS = H2Limits(
    max_header_count=H2Limits().max_header_count + MESH_FIELDS,
    max_header_list_size=H2Limits().max_header_list_size + MESH_FIELD_BYTES,
)
_APP = "app"
_DROP = frozenset({TRACEPARENT})
_DROP_AND_ID = _DROP | {REQUEST_ID}


class H2Inbound:
    def __init__(
        self,
        cfg: SidecarConfig,
        *,
        catalog: Callable[[], Catalog],
        metrics: SidecarMetrics,
        runtime: Runtime,
        access_log: AccessLogSink,
        identity: str,
        limits: H2Limits = MESH_LIMITS,
    ) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.metrics = metrics
        self.rt = runtime
        self.access_log = access_log
        self.identity = identity
        self.limits = limits
        self.service_key = f"{cfg.namespace}/{cfg.service}"
        self.pool = H2Pool(
            idle_timeout_s=APP_IDLE_TIMEOUT_S, on_open=self._pool_open, on_close=self._pool_close
        )
        self.open: set[H2Connection] = set()
        self.draining = False
        self._grace_s = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def _idle_s(self) -> float:
        own = self.catalog().services.get(self.service_key)
        return own.policy.timeouts.idle_s if own is not None else 300.0

    async def serve(self, leg: TlsLeg, caller: SpiffeId) -> None:
        """Serve the streams of one mTLS connection whose caller passed every check."""
        loop = asyncio.get_running_loop()
        leg.accept()
        source = str(caller)

        def on_stream(down: H2Stream) -> None:
            call = InboundCall(self, down, source, loop)
            loop.call_soon(call.start)  # after the rest of this read: a reset in it wins

        conn = H2Connection(
            leg, client=False, limits=self.limits, clock=self.rt.clock, on_stream=on_stream
        )
        self.open.add(conn)
        try:
            conn.start()
            if self.draining:
                self._shutdown(conn)
            await close_when_idle(conn, self._idle_s())
        finally:
            self.open.discard(conn)
            if not conn.closed.done():
                conn.abort()
            count_error(self.metrics, "inbound", conn)

    def drain(self, grace_s: float) -> list[asyncio.Future[None]]:
        """GOAWAY to every caller; their open streams may finish within ``grace_s``.
        Returns what to wait for."""
        self.draining = True
        self._grace_s = grace_s
        for conn in self.open:
            self._shutdown(conn)
        return [conn.closed for conn in self.open]

    def _shutdown(self, conn: H2Connection) -> None:
        task = asyncio.get_running_loop().create_task(conn.shutdown(self._grace_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.open):
            conn.abort()
        self.pool.abort_all()

    async def dial_app(self) -> Side:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(APP_CONNECT_TIMEOUT_S):
            _, side = await loop.create_connection(PlainSide, *self.cfg.app_address)
        return side

    def _pool_open(self, key: Hashable) -> None:
        self.metrics.h2_pool_opened.labels("inbound", self.service_key).inc()
        self.metrics.h2_pool_connections.labels("inbound", self.service_key).inc()

    def _pool_close(self, key: Hashable) -> None:
        self.metrics.h2_pool_connections.labels("inbound", self.service_key).dec()


class InboundCall(Call):
    """One stream from a peer sidecar, forwarded to the app (see the module docstring)."""

    __slots__ = ("owner", "retried", "up_headers")

    def __init__(
        self, owner: H2Inbound, down: H2Stream, source: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        head = RequestHead.parse(down.headers or [])
        rec = Record(Direction.INBOUND, owner.service_key, owner.rt.clock.now(), loop.time())
        rec.source_identity, rec.destination_identity = source, owner.identity
        rec.x_forwarded_for = text(head.lookup.get(b"x-forwarded-for"))
        super().__init__(
            down,
            new_record(rec, head),
            head,
            copy_limit=MAX_BODY_HELD,
            metrics=owner.metrics,
            sink=owner.access_log,
            loop=loop,
        )
        self.owner = owner
        self.retried = False
        self.up_headers: Headers = []

    def start(self) -> None:
        if self.finished:
            return
        o, rec, lookup = self.owner, self.rec, self.head.lookup
        o.metrics.http_request("inbound", rec.service, "-")
        rng = o.rt.rng
        request_id, added = ensure_request_id(lookup, rng)
        outgoing = next_hop(Traceparent.parse(lookup.get(TRACEPARENT)), rng)
        add = [(TRACEPARENT, outgoing.format())]
        if added:
            add.append((REQUEST_ID, request_id))
        rec.request_id, rec.trace_id = text(request_id), outgoing.trace_id
        rec.upstream_host = f"{o.cfg.app_host}:{o.cfg.app_port}"
        rec.attempts = 1
        self.up_headers = forwarded(self.down.headers or [], _DROP_AND_ID if added else _DROP, add)
        self._try()

    def _try(self) -> None:
        t = Try(self, self.loop.time())
        self.try_ = t
        conn = self.owner.pool.ready(_APP)
        if conn is not None:
            self._open(t, conn)
        else:
            self._connect(t, 0)

    def _connect(self, t: Try, rounds: int) -> None:
        fut = self.owner.pool.connect(_APP, self.owner.dial_app)
        fut.add_done_callback(functools.partial(self._connected, t, rounds))

    def _connected(self, t: Try, rounds: int, fut: asyncio.Future[H2Connection]) -> None:
        exc = ConnectionError("cancelled") if fut.cancelled() else fut.exception()
        if t is not self.try_:
            return
        o = self.owner
        if exc is None:
            conn = o.pool.ready(_APP)
            if conn is not None:
                self._open(t, conn)
                return
            if rounds + 1 < MAX_ROUNDS:
                self._connect(t, rounds + 1)
                return
            exc = ConnectionError("no stream slot on new connections")
        self.try_ = None
        o.metrics.connect_errors.labels(self.rec.service, "app_unreachable").inc()
        log.warning(
            "the app does not accept HTTP/2 connections",
            extra={"port": o.cfg.app_port, "error": str(exc) or type(exc).__name__},
        )
        msg = f"the app does not accept connections on port {o.cfg.app_port}"
        self.reply(503, msg, ResponseFlag.UPSTREAM_CONNECTION_FAILURE)

    def _open(self, t: Try, conn: H2Connection) -> None:
        if not self.open_try(t, conn, self.up_headers):
            self.try_ = None
            msg = "cannot open an HTTP/2 stream to the app"
            self.reply(502, msg, ResponseFlag.UPSTREAM_PROTOCOL_ERROR)

    def on_response_head(self, t: Try, headers: Headers) -> None:
        self.rec.upstream_ms = int((self.loop.time() - t.started) * 1000)
        self.commit(t, headers)

    def on_try_failed(self, t: Try, code: int, reason: str) -> None:
        o = self.owner
        refused = reason == "refused" or code == ErrorCodes.REFUSED_STREAM
        stale = reason == "connection" and t.reused
        if (refused or stale) and not self.retried and self.body is not None:
            self.retried = True  # never processed, or a dead pooled connection: once more
            if stale:
                o.metrics.pool_stale.labels("inbound", self.rec.service).inc()
            self._try()
            return
        if reason == "headers":  # the app's response head was over the limits
            msg = "the app's response head is over the limits"
            self.reply(502, msg, ResponseFlag.UPSTREAM_PROTOCOL_ERROR)
            return
        self.rec.flags.append(ResponseFlag.UPSTREAM_CONNECTION_TERMINATION)
        self.reset_downstream(code if reason == "remote" else ErrorCodes.CANCEL)
