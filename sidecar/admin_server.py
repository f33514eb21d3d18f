"""A small HTTP/1.1 server for the sidecar's admin paths (``admin.respond``).

For: serving /ready, /stats/prometheus and the rest to curl, Docker health checks and
Prometheus without aiohttp, which would be the biggest import of an idle sidecar.
One request per connection (``Connection: close``); a request body is read and ignored.
Must never: listen anywhere but where it is told (127.0.0.1 by default), or keep a
connection that sends more than ``MAX_HEAD`` bytes of request head or stalls mid-request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from http import HTTPStatus

from meshlet.errors import ConflictError
from sidecar.admin import AdminState, Reply, respond

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT_S = 10.0
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _response(reply: Reply, *, allow: str | None, head_only: bool) -> bytes:
    reason = HTTPStatus(reply.status).phrase
    lines = [
        f"HTTP/1.1 {reply.status} {reason}",
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {len(reply.body)}",
        "Connection: close",
    ]
    if allow:
        lines.append(f"Allow: {allow}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + reply.body


def _bad(status: int, what: str) -> bytes:
    body = f'{{"error": "{what}"}}'.encode()
    return _response(Reply(status, body), allow=None, head_only=False)


def parse_head(head: bytes) -> tuple[str, str, int] | None:
    """Method, target and Content-Length of a request head; None when it is not HTTP/1.x."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[0] not in METHODS or not parts[2].startswith("HTTP/1."):
        return None
    if not parts[1].startswith("/"):
        return None
    length = 0
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                return None
            length = int(value.strip())
        elif name.strip().lower() == "transfer-encoding":
            return None  # chunked bodies: not for an admin endpoint
    return parts[0], parts[1], length


class AdminServer:
    """``await start(host, port)``; ``port`` is the bound port; ``await close()`` to stop."""

    def __init__(self, state: AdminState) -> None:
        self._state = state
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, reuse_address=True, limit=MAX_HEAD
            )
        except OSError as e:
            raise ConflictError(
                f"cannot listen for the admin endpoint on {host}:{port} ({e.strerror}): "
                "choose another --admin address"
            ) from e
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                writer.write(await self._answer(reader))
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _bad(431, "request head too large")
        parsed = parse_head(head[:-4])
        if parsed is None:
            return _bad(400, "not an HTTP/1.1 request")
        method, target, length = parsed
        if length > MAX_BODY:
            return _bad(413, "request body too large")
        if length:
            await reader.readexactly(length)
        reply, allow = await respond(self._state, method, target)
        return _response(reply, allow=allow, head_only=method == "HEAD")
