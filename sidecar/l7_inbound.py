"""Inbound L7: HTTP/1.1 from a peer sidecar (the mTLS leg negotiated ALPN ``http/1.1``),
parsed again and forwarded to the app over a small keep-alive pool of plain
connections to ``app_host:app_port``.

For: the same strict codec as the outbound side, so nothing malformed reaches the app
even from a caller that is not a meshlet sidecar (431 for oversized heads, 400 and a
closed connection for smuggling vectors; the limits leave room for the fields the
calling sidecar adds); ``traceparent`` continued with this hop's
span id, ``x-request-id`` kept (made only if a caller sent none), ``x-forwarded-for``
and everything else passed as they came. No retries and no timeouts of its own: the
calling sidecar decides those, and when it gives up it resets the connection, which
resets the app's connection here (the app's handler is abandoned). Only a pooled app
connection that the app had closed is replaced, once, for a request that is safe to
send again. Per-request metrics and access log lines say ``direction=inbound``.

Must never: forward a request before the caller's identity was checked (the caller of
``serve`` did that), or return an app connection to the pool mid-message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from certs.spiffe import SpiffeId
from meshlet.runtime import Runtime
from sidecar.accesslog import Direction, ResponseFlag
from sidecar.accesslog_sink import AccessLogSink
from sidecar.catalog import Catalog
from sidecar.config import SidecarConfig
from sidecar.http1 import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    BodyKind,
    HttpError,
    Request,
    RequestParser,
)
from sidecar.l7_exchange import (
    Gone,
    local_reply,
    no_body,
    read_body,
    request_head,
    send_rest,
    serve_downstream,
)
from sidecar.l7_io import Channel, Waker
from sidecar.l7_pool import Pool, UpstreamConn
from sidecar.l7_record import (
    Record,
    finish,
    header_lookup,
    text,
)
from sidecar.l7_response import (
    NoResponse,
    read_response_head,
    respond,
)
from sidecar.l7policy import is_idempotent
from sidecar.metrics import SidecarMetrics
from sidecar.relay import PlainSide
from sidecar.tlsleg import TlsLeg
from sidecar.trace import (
    REQUEST_ID,
    TRACEPARENT,
    Traceparent,
    ensure_request_id,
    next_hop,
)

log = logging.getLogger(__name__)

APP_CONNECT_TIMEOUT_S = 5.0
# App connections idle this long are closed: below the shortest keep-alive timeouts of
# common servers (Node's 5 s), so the app rarely closes one as a request arrives (the
# "503 UC" users of other meshes know). Reconnecting on loopback costs ~50 µs.
APP_IDLE_TIMEOUT_S = 3.0
MAX_BODY_HELD = 64 * 1024  # a body this small is held, so a stale app connection can be retried
# The outbound sidecar enforces Envoy's limits on the app's request and then adds up to
# four fields (x-request-id, traceparent, tracestate, x-forwarded-for): the inbound
# allows those on top, so whatever passed the outbound passes here too.
MESH_FIELDS = 4
MESH_FIELD_BYTES = 2 * 1024
_REPLACED = frozenset({TRACEPARENT, b"expect"})
_REPLACED_AND_ID = _REPLACED | {REQUEST_ID}
_APP = "app"


class L7Inbound:
    def __init__(
        self,
        cfg: SidecarConfig,
        *,
        catalog: Callable[[], Catalog],
        metrics: SidecarMetrics,
        runtime: Runtime,
        access_log: AccessLogSink,
        identity: str,
        header_timeout_s: float,
    ) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.metrics = metrics
        self.rt = runtime
        self.access_log = access_log
        self.identity = identity
        self.header_timeout_s = header_timeout_s
        self.service_key = f"{cfg.namespace}/{cfg.service}"
        self.pool = Pool(idle_timeout_s=APP_IDLE_TIMEOUT_S)
        self.open: dict[Channel[RequestParser], asyncio.Future[None]] = {}
        self.draining = False

    def _idle_s(self) -> float:
        own = self.catalog().services.get(self.service_key)
        return own.policy.timeouts.idle_s if own is not None else 300.0

    def drain(self) -> list[asyncio.Future[None]]:
        """Answer in-flight requests with ``connection: close`` and close idle
        connections; returns what to wait for."""
        self.draining = True
        for ch in self.open:
            if ch.waker is not None:
                ch.waker.wake()  # an idle connection notices and closes
        return list(self.open.values())

    def close(self) -> None:
        self.pool.abort_all()
        for ch in list(self.open):
            ch.abort()

    async def serve(self, leg: TlsLeg, caller: SpiffeId) -> None:
        """Serve the requests of one mTLS connection whose caller passed every check."""
        loop = asyncio.get_running_loop()
        leg.accept()
        parser = RequestParser(
            max_header_bytes=MAX_HEADER_BYTES + MESH_FIELD_BYTES,
            max_headers=MAX_HEADERS + MESH_FIELDS,
        )
        down: Channel[RequestParser] = Channel(leg, parser, Waker(loop))
        done: asyncio.Future[None] = loop.create_future()
        self.open[down] = done
        source = str(caller)

        def refused(e: HttpError) -> None:
            self.metrics.http_errors.labels("inbound", "downstream", str(e.status)).inc()
            rec = Record(Direction.INBOUND, self.service_key, self.rt.clock.now(), loop.time())
            rec.status, rec.flags = e.status, [ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR]
            rec.source_identity = source
            finish(rec, self.metrics, self.access_log, loop.time())

        async def handle(req: Request) -> bool:
            return await self._request(down, req, source)

        try:
            down.start()
            ended = await serve_downstream(
                down,
                handle,
                header_timeout_s=self.header_timeout_s,
                idle_timeout_s=self._idle_s(),
                refused=refused,
                draining=lambda: self.draining,
            )
            if ended == "header_timeout":
                self.metrics.http_errors.labels("inbound", "downstream", "header_timeout").inc()
        finally:
            del self.open[down]
            done.set_result(None)

    async def _app_connection(self, fresh: bool) -> UpstreamConn:
        loop = asyncio.get_running_loop()

        async def connect() -> PlainSide:
            async with asyncio.timeout(APP_CONNECT_TIMEOUT_S):
                _, side = await loop.create_connection(PlainSide, *self.cfg.app_address)
            return side

        return await self.pool.acquire(_APP, connect, fresh=fresh)

    async def _request(self, down: Channel[RequestParser], req: Request, source: str) -> bool:
        loop = asyncio.get_running_loop()
        rec = Record(Direction.INBOUND, self.service_key, self.rt.clock.now(), loop.time())
        rec.source_identity, rec.destination_identity = source, self.identity
        lookup = header_lookup(req.headers)
        rec.of_request(req, lookup)
        rec.x_forwarded_for = text(lookup.get(b"x-forwarded-for"))
        self.metrics.http_request("inbound", self.service_key, "-")
        try:
            return await self._forward(down, req, lookup, rec)
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
        msg: str,
        body_read: bool,
    ) -> bool:
        keep = req.keep_alive and not self.draining and body_read
        down.write(local_reply(status, msg, keep_alive=keep))
        rec.status = status
        return keep

    async def _forward(
        self,
        down: Channel[RequestParser],
        req: Request,
        lookup: dict[bytes, bytes],
        rec: Record,
    ) -> bool:
        loop = asyncio.get_running_loop()
        rng = self.rt.rng
        request_id, added = ensure_request_id(lookup, rng)
        outgoing = next_hop(Traceparent.parse(lookup.get(TRACEPARENT)), rng)
        add = [(TRACEPARENT, outgoing.format())]
        if added:
            add.append((REQUEST_ID, request_id))
        rec.request_id, rec.trace_id = text(request_id), outgoing.trace_id
        head = request_head(req, add, _REPLACED_AND_ID if added else _REPLACED)
        idle_s = self._idle_s()
        if req.body is BodyKind.NONE:  # the common GET: its end is already parsed
            body = no_body(down)
        else:
            try:
                body = await read_body(down, req, MAX_BODY_HELD, idle_s)
            except HttpError as e:
                self.metrics.http_errors.labels("inbound", "downstream", str(e.status)).inc()
                rec.flags.append(ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR)
                down.write(local_reply(e.status, e.reason, keep_alive=False))
                rec.status = e.status
                return False
        if body.complete:
            rec.bytes_received = body.size
        replayable = body.complete and is_idempotent(req.method)
        waker = down.waker
        assert waker is not None
        fresh = False
        rec.upstream_host = f"{self.cfg.app_host}:{self.cfg.app_port}"
        rec.attempts = 1
        while True:
            started = loop.time()
            try:
                conn = None if fresh else self.pool.take_idle(_APP)
                if conn is None:
                    conn = await self._app_connection(fresh)
            except (OSError, TimeoutError) as e:
                self.metrics.connect_errors.labels(self.service_key, "app_unreachable").inc()
                log.warning(
                    "the app does not accept connections",
                    extra={"port": self.cfg.app_port, "error": str(e)},
                )
                rec.flags.append(ResponseFlag.UPSTREAM_CONNECTION_FAILURE)
                msg = f"the app does not accept connections on port {self.cfg.app_port}"
                return self._reply(down, req, rec, 503, msg, body.complete)
            reused = conn.exchanges > 0
            conn.begin(req.method, waker, upgrade=req.upgrade is not None)
            up = conn.channel
            up.write(head + body.encoded(req.body))
            try:
                if not body.complete:
                    rec.bytes_received = await send_rest(up, down, req, body, None, idle_s)
                resp = await read_response_head(up, down, None, forward_1xx=req.version == "1.1")
            except Gone:
                self.pool.discard(conn)  # the app sees a reset: its handler is abandoned
                raise
            except HttpError as e:
                self.pool.discard(conn)
                if e.status != 502:  # the caller's body was malformed mid-way
                    raise Gone(f"malformed request body: {e.reason}") from None
                self.metrics.http_errors.labels("inbound", "upstream", "502").inc()
                rec.flags.append(ResponseFlag.UPSTREAM_PROTOCOL_ERROR)
                return self._reply(down, req, rec, 502, e.reason, body.complete)
            except (NoResponse, ConnectionError) as e:
                self.pool.discard(conn)
                stale = isinstance(e, NoResponse) and not e.any_bytes
                if stale and reused and replayable and not fresh:
                    self.metrics.pool_stale.labels("inbound", self.service_key).inc()
                    fresh = True
                    continue
                rec.flags.append(ResponseFlag.UPSTREAM_CONNECTION_TERMINATION)
                msg = f"the app closed the connection before answering ({e})"
                return self._reply(down, req, rec, 503, msg, body.complete)
            if resp is None:  # the caller left (it gave up): abandon the app's request
                self.pool.discard(conn)
                raise Gone("the caller left while the app was answering")
            rec.upstream_ms = int((loop.time() - started) * 1000)
            return await respond(
                self.pool, down, req, rec, conn, resp, (), idle_s, close=self.draining
            )
