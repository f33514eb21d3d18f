"""The two HTTP/1.1 parsers: ``RequestParser`` (downstream: requests from a client) and
``ResponseParser`` (upstream: responses to the requests the proxy sent).

For: turning a head that llhttp accepted into a normalized ``Request``/``Response``,
after the rules llhttp does not enforce (see ``sidecar.http1``'s docstring for the full
list and ``sidecar.http1_rules`` for the byte-level ones), and choosing its body
framing. The buffering and the state machine live in ``sidecar.http1_conn``.

Must never: import asyncio/socket/ssl, keep a header the next hop could read as
framing or as a connection option, or guess between two readings of a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import httptools

from sidecar import http1_rules as rules
from sidecar.http1_conn import MAX_HEADER_BYTES, MAX_HEADERS, Connection, Phase
from sidecar.http1_model import (
    NOT_IN_HEADERS,
    BodyKind,
    HttpError,
    Informational,
    ParsedHeaders,
    Request,
    RequestEvent,
    Response,
    ResponseEvent,
    ResponseHeadersTooLarge,
    UpstreamHttpError,
    fast_constructor,
)

_VERSIONS = ("1.0", "1.1")
_SPECIAL = NOT_IN_HEADERS | {b"host", b"expect"}
# A Connection header may not make these hop-by-hop: the message cannot lose them.
_UNDROPPABLE = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})
_METHOD_SP = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")

Fields = list[tuple[bytes, bytes]]
_make_request = fast_constructor(Request)  # fields in declaration order
_make_response = fast_constructor(Response)


def _split_fields(fields: Fields) -> tuple[Fields, dict[bytes, list[bytes]]]:
    """Lower-case names, trim values, pull out the fields that become message fields."""
    if not fields:
        return [], {}
    joined = b"\n".join([name for name, _ in fields]).lower()  # one C call for all names
    names = joined.split(b"\n")
    headers = list(zip(names, [value.strip(b" \t") for _, value in fields], strict=True))
    special: dict[bytes, list[bytes]] = {}
    if not _SPECIAL.isdisjoint(names):
        kept = []
        for header in headers:
            name = header[0]
            if name in _SPECIAL:
                special.setdefault(name, []).append(header[1])
                if name in NOT_IN_HEADERS:
                    continue
            kept.append(header)
        headers = kept
    if b"_" in joined:
        for name in names:
            rules.check_name(name)
    return headers, special


def _options(special: dict[bytes, list[bytes]], headers: Fields) -> tuple[set[bytes], Fields]:
    """Connection's options, and the headers without the fields it names (hop-by-hop)."""
    values = special.get(b"connection")
    if not values:
        return set(), headers
    options = {t.strip(b" \t").lower() for v in values for t in v.split(b",")} - {b""}
    named = options - {b"close", b"keep-alive", b"upgrade"}
    if named & _UNDROPPABLE:
        raise HttpError(400, f"Connection names {sorted(named & _UNDROPPABLE)}, which must stay")
    if named:
        headers = [h for h in headers if h[0] not in named]
    return options, headers


def _keep_alive(version: str, options: set[bytes]) -> bool:
    if b"close" in options:
        return False
    return version == "1.1" or b"keep-alive" in options


def _with_host(headers: Fields, authority: bytes) -> Fields:
    """An absolute-form target's authority replaces Host (RFC 9112 §3.2.2)."""
    if any(name == b"host" for name, _ in headers):
        return [(n, authority if n == b"host" else v) for n, v in headers]
    return [(b"host", authority), *headers]


class RequestParser(Connection[RequestEvent, httptools.HttpRequestParser]):
    """Parses the requests a client sends (the proxy's downstream). One message at a
    time: after ``EndOfMessage`` it is PAUSED until ``start_next()``."""

    _role = "request"

    def __init__(
        self,
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_headers: int = MAX_HEADERS,
        allowed_upgrades: Iterable[bytes] = (b"websocket",),
    ) -> None:
        self._allowed_upgrades = frozenset(p.lower() for p in allowed_upgrades)
        self._upgrading = False
        super().__init__(max_header_bytes=max_header_bytes, max_headers=max_headers)

    def start_next(self) -> None:
        """Parse the next (pipelined) request. After a ``keep_alive=False`` request the
        parser yields ``ConnectionClosed`` instead and drops what the client sent after."""
        self._start_next()

    def switch_to_tunnel(self) -> bytes:
        """After an Upgrade request's ``EndOfMessage``, once the upstream answered 101:
        the bytes the client already sent after the head. Relay everything raw from now
        on. If the upstream refused (not 101), call ``start_next()`` instead."""
        if self._phase is not Phase.DONE or not self._upgrading:
            raise RuntimeError("switch_to_tunnel() is for after an Upgrade request's end")
        return self._take_tunnel()

    def _new_llhttp(self) -> httptools.HttpRequestParser:
        return httptools.HttpRequestParser(self._callbacks)

    def _llhttp_error(self, exc: httptools.HttpParserError) -> HttpError:
        text = str(exc)
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            start = self._block or bytes(self._buf[:64])
            if _METHOD_SP.match(start):
                return HttpError(501, f"method {start.split(b' ', 1)[0][:32]!r} is not supported")
            return HttpError(400, "request line does not start with a method")
        if self._llhttp.get_http_version() == "2.0":
            return HttpError(505, "HTTP/2 (the h2 preface) on an HTTP/1.1 listener")
        if "Invalid" in text and "version" in text:
            return HttpError(505, f"{text}: only HTTP/1.0 and HTTP/1.1 are served here")
        return HttpError(400, f"malformed request: {text}")

    def _on_head(self) -> None:
        llhttp = self._llhttp
        version = llhttp.get_http_version()
        if version not in _VERSIONS:
            raise HttpError(505, f"HTTP/{version} is not served here; use HTTP/1.1")
        method_bytes, target_bytes, block = llhttp.get_method(), b"".join(self._first), self._block
        line = b"%s %s HTTP/%s" % (method_bytes, target_bytes, version.encode())
        if block[: block.find(b"\r\n")] != line:
            raise HttpError(400, "request line is not exactly 'METHOD SP target SP HTTP/1.x'")
        rules.check_lines(block, len(self._fields) + 2, "request head")
        method = method_bytes.decode("ascii")
        if method == "CONNECT":
            raise HttpError(501, "CONNECT is not supported: the sidecar is not a forward proxy")
        target, authority = rules.split_target(method, target_bytes)
        headers, special = _split_fields(self._fields)
        options, headers = _options(special, headers)

        body, length = BodyKind.NONE, None
        te, cl = special.get(b"transfer-encoding"), special.get(b"content-length")
        if te is not None:
            if cl is not None:
                raise HttpError(400, "both Content-Length and Transfer-Encoding (CL.TE smuggling)")
            if version == "1.0":
                raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
            rules.check_chunked(te)
            body = BodyKind.CHUNKED
        elif cl is not None:
            body, length = BodyKind.LENGTH, rules.content_length(cl)

        hosts = special.get(b"host", [])
        if len(hosts) > 1:
            raise HttpError(400, f"{len(hosts)} Host headers; send exactly one")
        if not hosts and version == "1.1":
            raise HttpError(400, "HTTP/1.1 request without a Host header")
        if hosts:
            rules.check_host(hosts[0])
        if authority is not None:
            headers = _with_host(headers, authority)

        upgrade = None
        if b"upgrade" in options and b"upgrade" in special:
            if version == "1.0":
                raise HttpError(400, "Upgrade in an HTTP/1.0 request")
            upgrade = rules.upgrade_protocols(special[b"upgrade"], self._allowed_upgrades)
        if (upgrade is not None or llhttp.should_upgrade()) and (length or te is not None):
            raise HttpError(400, "Upgrade request with a body (its end would be ambiguous)")

        expect_continue = False
        for value in special.get(b"expect", ()):
            if value.lower() != b"100-continue":
                raise HttpError(417, f"Expect {value[:40]!r} cannot be met (only 100-continue)")
            expect_continue = version == "1.1"

        self._body, self._left = body, length or 0
        self._keep_alive = _keep_alive(version, options)
        self._upgrading = upgrade is not None
        self._events.append(
            _make_request(
                method,
                target,
                version,
                ParsedHeaders(headers),
                body,
                length,
                self._keep_alive,
                upgrade,
                expect_continue,
            )
        )


class ResponseParser(Connection[ResponseEvent, httptools.HttpResponseParser]):
    """Parses the responses of one upstream connection, one request at a time: it is
    told the request's method (HEAD responses have no body) and whether it asked to
    upgrade (a 101 is refused otherwise). 1xx responses come as ``Informational``."""

    _role = "response"

    def __init__(
        self,
        *,
        request_method: str,
        upgrade_requested: bool = False,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        self._method = request_method
        self._upgrade_requested = upgrade_requested
        super().__init__(max_header_bytes=max_header_bytes, max_headers=max_headers)

    def start_next(self, *, request_method: str, upgrade_requested: bool = False) -> None:
        """Expect the response to the next request sent on this connection. Raises
        ``UpstreamHttpError`` if the upstream sent bytes nobody asked for (a response
        that would otherwise be taken for the next request's)."""
        if self._phase is Phase.DONE and self._keep_alive and self._buf:
            self._error = UpstreamHttpError(
                f"upstream sent {len(self._buf)} bytes after a complete response"
            )
            self._phase = Phase.FAILED
            raise self._error
        self._start_next()
        self._method, self._upgrade_requested = request_method, upgrade_requested

    def switch_to_tunnel(self) -> bytes:
        """After a 101 (``next_event`` returned SWITCHED): the bytes the upstream already
        sent after the head. Relay everything raw from now on."""
        if self._phase is not Phase.SWITCHED:
            raise RuntimeError("switch_to_tunnel() is for after a 101 response")
        return self._take_tunnel()

    def _new_llhttp(self) -> httptools.HttpResponseParser:
        return httptools.HttpResponseParser(self._callbacks)

    def _translate(self, exc: HttpError) -> HttpError:
        if isinstance(exc, UpstreamHttpError):
            return exc
        if exc.status == 431:
            return ResponseHeadersTooLarge(f"upstream response head: {exc.reason}")
        return UpstreamHttpError(f"upstream response: {exc.reason}")

    def _on_head(self) -> None:
        llhttp = self._llhttp
        version = llhttp.get_http_version()
        if version not in _VERSIONS:
            raise HttpError(400, f"HTTP/{version} response")
        status, reason, block = llhttp.get_status_code(), b"".join(self._first), self._block
        start = b"HTTP/%s %d" % (version.encode(), status)
        line = block[: block.find(b"\r\n")]
        if line != start + b" " + reason and (reason or line != start):
            raise HttpError(400, "status line is not exactly 'HTTP/1.x SP code SP reason'")
        rules.check_lines(block, len(self._fields) + 2, "response head")
        if not 100 <= status <= 599:
            raise HttpError(400, f"status {status} is out of range")
        headers, special = _split_fields(self._fields)
        options, headers = _options(special, headers)
        if status < 200 and status != 101:
            self._interim = True
            self._events.append(Informational(status=status, reason=reason, headers=tuple(headers)))
            return

        keep_alive = _keep_alive(version, options)
        body, length, upgrade = BodyKind.NONE, None, None
        te, cl = special.get(b"transfer-encoding"), special.get(b"content-length")
        if status == 101:
            if not self._upgrade_requested:
                raise HttpError(400, "101 Switching Protocols to a request that did not upgrade")
            if b"upgrade" not in options or b"upgrade" not in special:
                raise HttpError(400, "101 without 'Connection: upgrade' and an Upgrade header")
            upgrade, self._switch = b", ".join(special[b"upgrade"]), True
        elif self._method == "HEAD" or status in (204, 304):
            if cl is not None and status != 204:
                length = rules.content_length(cl)  # what a GET would carry: passed on
            if self._method == "HEAD":  # llhttp cannot know: it may wait for a body
                self._llhttp_lags = self._stale = True
        elif te is not None:
            if cl is not None:
                raise HttpError(400, "both Content-Length and Transfer-Encoding")
            if version == "1.0":
                raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 response")
            rules.check_chunked(te)
            body = BodyKind.CHUNKED
        elif cl is not None:
            body, length = BodyKind.LENGTH, rules.content_length(cl)
        else:
            body, keep_alive = BodyKind.UNTIL_CLOSE, False

        self._body, self._left = body, (length or 0) if body is BodyKind.LENGTH else 0
        self._keep_alive = keep_alive
        self._events.append(
            _make_response(
                status,
                reason,
                version,
                ParsedHeaders(headers),
                body,
                length,
                keep_alive,
                upgrade,
            )
        )
