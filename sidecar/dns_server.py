"""The sidecar's DNS server: UDP and TCP on one loopback address inside the container.

A thin shell around ``sidecar.dns``: it reads packets, asks ``parse_query``/``decide``
what to answer, and writes bytes. Mesh names are answered synchronously inside the
protocol callback (no task, no await); only forwarding to the container's original
resolver does I/O, in at most ``max_forwards`` tasks at once (beyond that: SERVFAIL).
A UDP client gets at most 512 bytes (or its EDNS size, up to 1232) with TC set when the
answer is bigger; a TCP client gets it all. A truncated upstream answer is passed through
with TC, and the client's retry over TCP is forwarded over TCP.

Must never: decide what a name means (that is ``sidecar.dns``), forward to its own
address, let one bad packet or client stop it from answering the next, or leave a task
running after ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import dns.message

from sidecar import dns as answers
from sidecar.catalog import Catalog

log = logging.getLogger(__name__)

Send = Callable[[bytes], None]
_BIND_ATTEMPTS = 20


class DnsServer:
    """Serve mesh names from ``catalog_provider()`` (called on every query, so a new
    catalog is visible on the next query) and forward other names to ``upstreams``."""

    def __init__(
        self,
        address: tuple[str, int],
        catalog_provider: Callable[[], Catalog],
        local_namespace: str,
        upstreams: list[tuple[str, int]],
        *,
        ttl: int = 5,
        forward_timeout_s: float = 2.0,
        max_forwards: int = 256,
        max_tcp_clients: int = 256,
        tcp_idle_timeout_s: float = 10.0,
    ) -> None:
        self._requested = address
        self._catalog_provider = catalog_provider
        self._namespace = local_namespace
        self._upstreams = list(upstreams)
        self._ttl = ttl
        self._forward_timeout_s = forward_timeout_s
        self._max_forwards = max_forwards
        self._max_tcp_clients = max_tcp_clients
        self._tcp_idle_timeout_s = tcp_idle_timeout_s
        self._counters = dict.fromkeys([*(o.value for o in answers.Outcome), "dropped", "error"], 0)
        self._rotation = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._bound: tuple[str, int] | None = None
        self._forwards: set[asyncio.Task[None]] = set()
        self._tcp_clients: set[_TcpClient] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); with port 0 requested, the port the OS chose."""
        if self._bound is None:
            raise RuntimeError("DnsServer.address is known once start() has returned")
        return self._bound

    @property
    def counters(self) -> dict[str, int]:
        """Queries by outcome: answered, nxdomain, forwarded, forward_failed, formerr;
        dropped (too short to answer, or a response rather than a query); error (a bug
        or a failing catalog provider: SERVFAIL, logged)."""
        return dict(self._counters)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self._requested
        for attempt in range(_BIND_ATTEMPTS):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(host, port)
            )
            bound = udp.get_extra_info("sockname")
            try:
                self._tcp = await loop.create_server(
                    lambda: _TcpClient(self), host, bound[1], reuse_address=True
                )
            except OSError:
                udp.close()
                if port != 0 or attempt == _BIND_ATTEMPTS - 1:
                    raise
                continue  # the OS gave us a UDP port whose TCP twin is taken: try another
            self._udp = udp
            self._bound = (bound[0], bound[1])
            break
        # Never forward to ourselves: resolv.conf may already name this server.
        self._upstreams = [u for u in self._upstreams if u != self._bound]
        if not self._upstreams:
            log.warning("dns: no upstream resolver; names outside the mesh get SERVFAIL")
        log.info("dns: serving on %s:%d (udp+tcp), upstreams %s", *self.address, self._upstreams)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for client in list(self._tcp_clients):
            client.abort()
        for task in list(self._forwards):
            task.cancel()
        await asyncio.gather(*self._forwards, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
        self._udp = self._tcp = None
        log.info("dns: stopped, counters %s", self._counters)

    async def run(self) -> None:
        """Serve until cancelled (for an ``asyncio.TaskGroup``), then stop."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    # The per-query path, shared by UDP and TCP.

    def handle(self, wire: bytes, send: Send, *, tcp: bool) -> None:
        """Answer one query: now, if it is ours, or later, from a forward task."""
        parsed: dns.message.Message | answers.Reply | None = None
        try:
            parsed = answers.parse_query(wire)
            if parsed is None:
                self._counters["dropped"] += 1
                return
            if isinstance(parsed, answers.Reply):
                self._reply(parsed, send, answers.TCP_MAX if tcp else answers.UDP_MIN_PAYLOAD)
                return
            self._rotation += 1
            decision = answers.decide(
                parsed,
                self._catalog_provider(),
                self._namespace,
                ttl=self._ttl,
                rotation=self._rotation,
            )
            if isinstance(decision, answers.Reply):
                limit = answers.TCP_MAX if tcp else answers.udp_limit(parsed)
                self._reply(decision, send, limit)
                return
        except Exception:  # a bug or a failing catalog must not take the server down
            log.exception("dns: could not answer a %d-byte query", len(wire))
            self._counters["error"] += 1
            if isinstance(parsed, dns.message.Message):
                with contextlib.suppress(Exception):
                    reply = answers.servfail(parsed)
                    send(answers.render(reply, max_size=answers.UDP_MIN_PAYLOAD))
            return
        self._start_forward(wire, decision.query, send, tcp=tcp)

    def _reply(self, reply: answers.Reply, send: Send, limit: int) -> None:
        self._counters[reply.outcome.value] += 1
        send(answers.render(reply, max_size=limit))

    def _start_forward(
        self, wire: bytes, query: dns.message.Message, send: Send, *, tcp: bool
    ) -> None:
        limit = answers.TCP_MAX if tcp else answers.udp_limit(query, cap=answers.TCP_MAX)
        if not self._upstreams or len(self._forwards) >= self._max_forwards:
            self._reply(answers.servfail(query), send, limit)
            return
        task = asyncio.get_running_loop().create_task(self._forward(wire, query, send, limit, tcp))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def _forward(
        self, wire: bytes, query: dns.message.Message, send: Send, limit: int, tcp: bool
    ) -> None:
        answer = await self._ask_upstreams(wire, query, tcp=tcp)
        if answer is None:
            self._reply(answers.servfail(query), send, limit)
        elif len(answer) > limit:  # an upstream that ignored the client's size
            self._reply(answers.truncated(query), send, limit)
        else:
            self._counters[answers.Outcome.FORWARDED.value] += 1
            send(answer)

    async def _ask_upstreams(
        self, wire: bytes, query: dns.message.Message, *, tcp: bool
    ) -> bytes | None:
        """Ask each upstream in turn within ``forward_timeout_s`` in all; a SERVFAIL or
        REFUSED is kept only if no later upstream does better."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._forward_timeout_s
        fallback: bytes | None = None
        ask = _ask_tcp if tcp else _ask_udp
        for i, upstream in enumerate(self._upstreams):
            share = (deadline - loop.time()) / (len(self._upstreams) - i)
            if share <= 0:
                break
            try:
                async with asyncio.timeout(share):
                    verdict, answer = await ask(upstream, wire, query)
            except (TimeoutError, OSError, EOFError) as e:
                log.debug("dns: upstream %s:%d failed: %r", *upstream, e)
                continue
            if verdict is not answers.Upstream.TRY_NEXT:
                return answer
            fallback = answer
        return fallback


Asked = tuple[answers.Upstream, bytes]


async def _ask_udp(upstream: tuple[str, int], wire: bytes, query: dns.message.Message) -> Asked:
    """One query on a fresh connected UDP socket (a new random source port each time)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Asked] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UpstreamUdp(query, done), remote_addr=upstream
    )
    try:
        transport.sendto(wire)
        return await done
    finally:
        transport.close()


async def _ask_tcp(upstream: tuple[str, int], wire: bytes, query: dns.message.Message) -> Asked:
    reader, writer = await asyncio.open_connection(*upstream)
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        while True:
            size = int.from_bytes(await reader.readexactly(2), "big")
            answer = await reader.readexactly(size)
            verdict = answers.check_upstream(query, answer)
            if verdict is not answers.Upstream.NOT_OURS:
                return verdict, answer
    finally:
        writer.close()


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self, query: dns.message.Message, done: asyncio.Future[Asked]) -> None:
        self._query = query
        self._done = done

    def datagram_received(self, data: bytes, addr: Any) -> None:
        verdict = answers.check_upstream(self._query, data)
        if verdict is not answers.Upstream.NOT_OURS and not self._done.done():
            self._done.set_result((verdict, data))

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        if not self._done.done():
            self._done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(exc or ConnectionError("upstream socket closed"))


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        transport = self._transport

        def send(payload: bytes) -> None:
            if transport is not None and not transport.is_closing():
                transport.sendto(payload, addr)

        self._server.handle(data, send, tcp=False)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns: udp error: %r", exc)  # a client went away before its answer


class _TcpClient(asyncio.Protocol):
    """RFC 7766 framing: each message is preceded by its 2-byte length; several queries
    may be in flight on one connection and answers may come back out of order."""

    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending = 0
        self._eof = False
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        clients = self._server._tcp_clients
        if len(clients) >= self._server._max_tcp_clients:
            log.debug("dns: too many tcp clients, closing a new one")
            transport.abort()  # type: ignore[attr-defined]
            return
        clients.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 2:
            size = int.from_bytes(self._buffer[:2], "big")
            if len(self._buffer) < 2 + size:
                break  # at most 2 + 65535 bytes are ever buffered
            wire = bytes(self._buffer[2 : 2 + size])
            del self._buffer[: 2 + size]
            self._arm_idle()  # only whole messages count as activity (no slowloris)
            self._pending += 1
            self._server.handle(wire, self._send_once(), tcp=True)

    def _send_once(self) -> Send:
        sent = False

        def send(payload: bytes) -> None:
            nonlocal sent
            if sent:
                return
            sent = True
            self._pending -= 1
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(len(payload).to_bytes(2, "big") + payload)
                if self._eof and self._pending == 0:
                    transport.close()

        return send

    def eof_received(self) -> bool:
        # The client may half-close after its last query: keep writing until it is answered.
        self._eof = True
        if self._pending <= 0 and self._transport is not None:
            self._transport.close()
        return True

    def pause_writing(self) -> None:  # a client that does not read its answers
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._tcp_clients.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._buffer.clear()
        self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self._server._tcp_idle_timeout_s, self._on_idle)

    def _on_idle(self) -> None:
        if self._pending > 0:
            self._arm_idle()  # still waiting on the upstream for this client
        elif self._transport is not None:
            self._transport.close()
