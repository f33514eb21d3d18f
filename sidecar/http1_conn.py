"""The sans-IO machinery both HTTP/1.1 parsers share: buffering, where a message ends,
feeding llhttp, and the pull API (``receive_data`` / ``next_event`` / ``start_next``).

For: ``sidecar.http1_parse`` subclasses ``Connection`` with the request and response
head rules. Our code decides where every message ends (the blank line of a head, the
Content-Length count, the end of a chunked body found by ``ChunkScanner``) and feeds
llhttp exactly those bytes, never one byte of the next message; llhttp parses the same
bytes and must agree at every boundary (its message-complete lands exactly where ours
does), otherwise the message is refused. So nothing is parsed ahead of the message the
shell is working on, pipelined requests wait raw in the buffer, and the bytes after an
Upgrade head are still raw when the tunnel starts.

Must never: import asyncio/socket/ssl, read the clock, feed llhttp past a message end,
release an event of a message after that message failed, or let llhttp's leniency
decide anything alone.
"""

from __future__ import annotations

import enum
import types
from collections import deque
from typing import Any, Generic, TypeVar

import httptools

from sidecar import http1_rules as rules
from sidecar.http1_model import (
    CONNECTION_CLOSED,
    END_OF_MESSAGE,
    NEED_DATA,
    PAUSED,
    SWITCHED,
    BodyKind,
    Data,
    HttpError,
    Trailers,
    Wait,
)

E = TypeVar("E")  # the events of the role
P = TypeVar("P", httptools.HttpRequestParser, httptools.HttpResponseParser)

MAX_HEADER_BYTES = 60 * 1024  # Envoy's default: request line + fields + blank line
MAX_HEADERS = 100  # Envoy's default number of header fields


class Phase(enum.Enum):
    HEAD = "head"  # waiting for (the rest of) a head
    LENGTH = "length"  # in a Content-Length body
    CHUNKED = "chunked"  # in a chunked body
    UNTIL_CLOSE = "until_close"  # in a body that ends at EOF (responses)
    DONE = "done"  # message complete; the next one waits for start_next()
    CLOSED = "closed"  # no more messages on this connection
    SWITCHED = "switched"  # the connection is a tunnel now
    FAILED = "failed"  # an HttpError was raised; it is raised again


class Connection(Generic[E, P]):
    """One direction of one HTTP/1.1 connection. Subclasses implement ``_new_llhttp``,
    ``_on_head`` (validate the head in ``self._block``, queue its event, set the body
    framing) and ``_translate`` (an error in this role's terms)."""

    _role = "message"

    def __init__(self, *, max_header_bytes: int, max_headers: int) -> None:
        self._max_bytes = max_header_bytes
        self._max_headers = max_headers
        self._buf = bytearray()
        self._eof = False
        self._events: deque[Any] = deque()  # E, Data, Trailers, EndOfMessage
        self._phase = Phase.HEAD
        self._error: HttpError | None = None
        self._chunks = rules.ChunkScanner(max_header_bytes)
        self._callbacks = types.SimpleNamespace(
            on_message_begin=self._on_message_begin,
            on_url=self._on_first_line,
            on_status=self._on_first_line,
            on_header=self._on_header,
            on_headers_complete=self._on_headers_complete,
            on_body=self._on_body,
            on_message_complete=self._on_message_complete,
        )
        self._llhttp: P = self._new_llhttp()
        self._stale = False  # llhttp's state cannot carry on to the next message
        self._fed = 0  # bytes of the current head already fed to llhttp
        self._scanned = 0  # bytes of the buffer searched for the end of the head
        self._lead = 0  # empty lines skipped before the current head
        self._partial = False  # feeding a head whose blank line has not arrived
        self._block = b""  # the current head, exactly as received
        self._first: list[bytes] = []  # request target / reason phrase pieces
        self._fields: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._head_seen = False  # llhttp reported the end of the head
        self._done = False  # llhttp reported the end of the message
        # Set by _on_head for the message in progress:
        self._body = BodyKind.NONE
        self._left = 0  # Content-Length bytes still to come
        self._keep_alive = True
        self._interim = False  # a 1xx head: the same exchange continues
        self._llhttp_lags = False  # llhttp cannot know this message has no body (HEAD)
        self._switch = False  # a 101: the connection becomes a tunnel after this head
        self._tunnel_taken = False  # switch_to_tunnel() was called: no more parsing

    # -- the public API ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer; ``b""`` means EOF. Nothing is parsed until next_event."""
        if self._tunnel_taken:
            raise RuntimeError("the connection is a tunnel now: relay bytes, do not parse")
        if data:
            if self._eof:
                raise RuntimeError("receive_data after EOF")
            if self._phase is not Phase.CLOSED:  # nothing after a close is processed
                self._buf += data
        else:
            self._eof = True

    def next_event(self) -> E | Wait:
        """The next event, or a ``Wait`` saying what the shell must do first. Raises
        ``HttpError`` (again on every later call) when the input must be refused."""
        if self._events:
            return self._events.popleft()  # type: ignore[no-any-return]  # an E
        if self._error is not None:
            raise self._error
        try:
            self._advance()
        except HttpError as exc:
            self._events.clear()  # nothing of a failed message is released
            self._error = self._translate(exc)
            self._phase = Phase.FAILED
            raise self._error from None
        if self._events:
            return self._events.popleft()  # type: ignore[no-any-return]  # an E
        phase = self._phase
        if phase is Phase.DONE:
            return PAUSED
        if phase is Phase.CLOSED:
            return CONNECTION_CLOSED  # type: ignore[return-value]  # every E has it
        if phase is Phase.SWITCHED:
            return SWITCHED
        return NEED_DATA

    @property
    def in_headers(self) -> bool:
        """A head has started arriving but is not complete: run the header timeout."""
        return self._phase is Phase.HEAD and bool(self._buf or self._lead or self._fed)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed (pipelined data while PAUSED): stop
        reading from the peer when this grows."""
        return len(self._buf)

    # -- for subclasses ------------------------------------------------------------

    def _new_llhttp(self) -> P:
        raise NotImplementedError

    def _on_head(self) -> None:
        raise NotImplementedError

    def _translate(self, exc: HttpError) -> HttpError:
        return exc

    def _llhttp_error(self, exc: httptools.HttpParserError) -> HttpError:
        return HttpError(400, f"malformed {self._role}: {exc}")

    # -- llhttp callbacks: they only collect ---------------------------------------

    def _on_message_begin(self) -> None:
        if self._done:  # never fed past our end, so llhttp ended the message early
            raise HttpError(400, f"{self._role}: llhttp and the framing disagree on its end")

    def _on_first_line(self, piece: bytes) -> None:
        self._first.append(piece)

    def _on_header(self, name: bytes, value: bytes) -> None:
        fields = self._trailers if self._head_seen else self._fields
        fields.append((name, value))
        if len(fields) > self._max_headers:
            raise HttpError(431, f"more than {self._max_headers} header fields")

    def _on_headers_complete(self) -> None:
        if self._partial:  # llhttp ended the head where our rules see no blank line
            raise HttpError(400, f"{self._role} head ends in a bare LF; lines must end in CRLF")
        self._head_seen = True

    def _on_body(self, data: bytes) -> None:
        self._events.append(Data(data))

    def _on_message_complete(self) -> None:
        self._done = True

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stale = True  # llhttp paused after an upgrade head; never resume it
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HttpError):
                raise exc.__context__ from None
            if not self._done:
                raise self._llhttp_error(exc) from None
            # After message-complete llhttp had no byte left, so this is only its
            # pause after a 101 or CONNECT: the message itself is fine.
            self._stale = True

    def _feed_part(self, stop: int) -> None:
        """Feed ``self._buf[:stop]`` to llhttp without copying, then drop it."""
        view = memoryview(self._buf)
        try:
            self._feed(view[:stop])
        finally:
            view.release()
        del self._buf[:stop]

    # -- the state machine ---------------------------------------------------------

    def _advance(self) -> None:
        while not self._events:
            phase = self._phase
            if phase is Phase.HEAD:
                progressed = self._advance_head()
            elif phase is Phase.LENGTH:
                progressed = self._advance_length()
            elif phase is Phase.CHUNKED:
                progressed = self._advance_chunked()
            elif phase is Phase.UNTIL_CLOSE:
                progressed = self._advance_until_close()
            else:
                return
            if not progressed:
                return

    def _advance_head(self) -> bool:
        buf = self._buf
        if not self._fed and buf and buf[0] in (13, 10):
            self._skip_empty_lines()
        if not buf:
            if self._eof:
                self._phase = Phase.CLOSED
            return False
        end = buf.find(b"\r\n\r\n", max(self._scanned - 3, 0))
        if end < 0:
            self._scanned = len(buf)
            if self._lead + len(buf) >= self._max_bytes:
                raise HttpError(431, f"{self._role} head over {self._max_bytes} bytes")
            if self._eof:
                raise HttpError(400, f"connection closed in the middle of a {self._role} head")
            # Once the start line is whole, feed what came so bad bytes fail at once.
            if self._fed < len(buf) and buf[0] != 13 and buf.find(b"\n", self._fed) >= 0:
                self._partial = True
                view = memoryview(buf)
                try:
                    self._feed(view[self._fed :])
                finally:
                    view.release()
                self._partial = False
                self._fed = len(buf)
            return False
        stop = end + 4
        if self._lead + stop > self._max_bytes:
            raise HttpError(431, f"{self._role} head over {self._max_bytes} bytes")
        self._block = block = bytes(buf[:stop])
        del buf[:stop]
        self._feed(block[self._fed :] if self._fed else block)
        self._fed = self._scanned = self._lead = 0
        if not self._head_seen:
            raise self._llhttp_error(httptools.HttpParserError("head not ended at the blank line"))
        self._on_head()
        self._start_body()
        return True

    def _skip_empty_lines(self) -> None:
        """RFC 9112 §2.2: a server SHOULD ignore empty lines before a request line. They
        count against the head size limit; a bare CR or LF among them is refused."""
        buf = self._buf
        n = len(buf) - len(buf.lstrip(b"\r\n"))
        pairs = n // 2
        if buf[: 2 * pairs] != b"\r\n" * pairs or (n % 2 and (n < len(buf) or buf[-1] != 13)):
            raise HttpError(400, f"bare CR or LF before the {self._role} line")
        del buf[: 2 * pairs]
        self._lead += 2 * pairs
        self._scanned = 0
        if self._lead >= self._max_bytes:
            raise HttpError(431, f"{self._role} head over {self._max_bytes} bytes")

    def _start_body(self) -> None:
        if self._interim:  # 1xx: llhttp is at the next head already, and so are we
            self._reset_message()
            return
        body = self._body
        if body is BodyKind.NONE or (body is BodyKind.LENGTH and not self._left):
            if not self._done and not self._llhttp_lags:
                raise HttpError(400, f"{self._role}: llhttp expects a body the headers do not")
            self._finish()
            return
        if self._done:
            raise HttpError(400, f"{self._role}: llhttp sees no body where the headers say one")
        if body is BodyKind.LENGTH:
            self._phase = Phase.LENGTH
        elif body is BodyKind.CHUNKED:
            self._chunks = rules.ChunkScanner(self._max_bytes)
            self._phase = Phase.CHUNKED
        else:
            self._stale = True  # llhttp never sees this body
            self._phase = Phase.UNTIL_CLOSE

    def _advance_length(self) -> bool:
        n = min(self._left, len(self._buf))
        if not n:
            if self._eof:
                raise HttpError(400, f"connection closed {self._left} bytes before the body end")
            return False
        self._feed_part(n)
        self._left -= n
        if self._left:
            if self._done:
                raise HttpError(400, f"{self._role}: llhttp ended the body early")
        elif not self._done:
            raise HttpError(400, f"{self._role}: llhttp did not end the body at Content-Length")
        else:
            self._finish()
        return True

    def _advance_chunked(self) -> bool:
        consumed, ended = self._chunks.scan(self._buf)
        if consumed:
            self._feed_part(consumed)
        if ended:
            if not self._done:
                raise HttpError(400, f"{self._role}: llhttp did not end the chunked body")
            trailer_block = self._chunks.trailer_block
            if trailer_block or self._trailers:
                rules.check_lines(trailer_block, len(self._trailers) + 1, "trailer section")
            self._finish()
            return True
        if self._done:
            raise HttpError(400, f"{self._role}: llhttp ended the chunked body early")
        if not consumed and self._eof:
            raise HttpError(400, "connection closed in the middle of a chunked body")
        return bool(consumed)

    def _advance_until_close(self) -> bool:
        if self._buf:
            self._events.append(Data(bytes(self._buf)))
            self._buf.clear()
            return True
        if self._eof:
            self._finish()
            return True
        return False

    def _finish(self) -> None:
        if self._trailers:
            trailers = rules.clean_trailers(self._trailers)
            if trailers:
                self._events.append(Trailers(trailers))
        self._events.append(END_OF_MESSAGE)
        self._phase = Phase.SWITCHED if self._switch else Phase.DONE
        self._reset_message()

    def _reset_message(self) -> None:
        self._block = b""
        self._first = []
        self._fields = []
        self._trailers = []
        self._head_seen = self._done = self._interim = self._llhttp_lags = False
        if self._stale:
            self._llhttp = self._new_llhttp()
            self._stale = False

    def _start_next(self) -> None:
        if self._phase is not Phase.DONE:
            raise RuntimeError("start_next() is for after EndOfMessage (when PAUSED)")
        if self._keep_alive:
            self._phase = Phase.HEAD
        else:  # RFC 9112 §9.6: nothing after a "close" message is processed
            self._phase = Phase.CLOSED
            self._buf.clear()

    def _take_tunnel(self) -> bytes:
        self._phase = Phase.SWITCHED
        self._tunnel_taken = True
        data = bytes(self._buf)
        self._buf.clear()
        return data
