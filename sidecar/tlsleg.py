"""The mTLS leg between sidecars: TLS 1.3 over a plain TCP transport, as a relay ``Side``.

For: the handshake (with a timeout and a named reason for every failure) and then the
application data of one sidecar-to-sidecar connection. TLS runs here, on an
``ssl.MemoryBIO`` pair, because asyncio's and uvloop's SSL transports cannot half-close
(``write_eof`` raises). With an ``SSLObject``, ``write_eof`` sends close_notify
(``unwrap``) while reading goes on, so EOF crosses the leg in each direction on its own.
Data is decrypted in large chunks per callback and encrypted into one transport write
per relay write.

Must never: raise out of a protocol callback (errors end the connection and resolve the
futures), deliver a byte before the handshake succeeded, decide whether a peer identity
is acceptable (the caller reads ``peer_certificate()``), or build SSLContexts
(``sidecar.tls`` does, once per certificate change).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import typing

from meshlet.errors import MeshError
from sidecar.relay import TransportSide
from sidecar.tls import failure_hint, handshake_reason

# Plaintext moves in pieces of ~64 KiB each way (decrypted per delivery, encrypted per
# transport write): pieces above glibc's mmap threshold (128 KiB) are mapped and unmapped
# per chunk, and the page faults cost ~30% more proxy CPU per GB (bench/relay_suite.py).
READ_CHUNK = 64 * 1024
WRITE_CHUNK = 64 * 1024
_RECORD = 16384  # TLS plaintext record size: what one SSLObject.read returns, at most
_TLS_HANDSHAKE_RECORD = 0x16  # a ClientHello starts with this byte, then 0x03

_HANDSHAKE, _CONFIRM, _OPEN, _FAILED = range(4)

_scratch = threading.local()  # one decrypt buffer per thread: a cache, never shared state


def _scratch_view() -> memoryview:
    try:
        view: memoryview = _scratch.view
    except AttributeError:
        view = _scratch.view = memoryview(bytearray(READ_CHUNK + _RECORD))
    return view


class TlsHandshakeError(MeshError):
    """The mTLS handshake with ``peer`` failed; ``reason`` is a short, stable name."""

    def __init__(self, message: str, *, reason: str, peer: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.peer = peer


class TlsLeg(TransportSide):
    """TLS 1.3 on a TCP transport, a relay ``Side`` once ``handshake`` has succeeded.

    A client resolves ``handshake`` only after the server's first post-handshake record
    (its session ticket) arrived: in TLS 1.3 the server checks the client certificate
    after the client has finished, so this is when a refusal (an alert) would be seen.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        handshake_timeout_s: float = 5.0,
        server_hostname: str | None = None,
        hold_until_accept: bool = False,
        session: ssl.SSLSession | None = None,
    ) -> None:
        super().__init__()
        self._ctx = context
        self._server_side = server_side
        self._hostname = server_hostname
        self._offer = session  # client: a session to resume (``sidecar.connect`` caches them)
        self._timeout_s = handshake_timeout_s
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self._state = _HANDSHAKE
        self._timer: asyncio.TimerHandle | None = None
        self._confirm_head = b""
        self._confirm_seen = 0
        self._sniffed = False
        self._eof_out = False  # we sent our close_notify (``_eof_in``: the peer's came)
        self._tcp_eof = False
        # Server side with hold_until_accept: what the handshake wrote after it completed
        # (the session ticket) is held until the caller decides: ``accept()`` sends it,
        # ``refuse()`` replaces it with close_notify, so a client sidecar learns of a
        # refusal before it reports success.
        self._hold = server_side and hold_until_accept
        self._held = False  # True between a held handshake's end and accept()/refuse()
        self.handshake: asyncio.Future[None] = self.closed.get_loop().create_future()

    # -- what the caller reads after the handshake ---------------------------------------

    def peer_certificate(self) -> bytes | None:
        """DER of the peer's leaf certificate, once the handshake succeeded."""
        if self._ssl is None or self._state != _OPEN:
            return None
        return self._ssl.getpeercert(binary_form=True)

    def session(self) -> ssl.SSLSession | None:
        """Client: the session to offer next time, once the handshake succeeded (the server's
        ticket is then in it: ``handshake`` resolves after that record)."""
        if self._ssl is None or self._state != _OPEN or self._server_side:
            return None
        return self._ssl.session

    def session_reused(self) -> bool:
        """Whether this connection resumed an earlier session (no certificates exchanged)."""
        return self._ssl is not None and self._state == _OPEN and self._ssl.session_reused

    def version(self) -> str | None:
        return self._ssl.version() if self._ssl is not None else None

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher() if self._ssl is not None else None

    def alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol() if self._ssl is not None else None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = self.closed.get_loop()
        self._timer = loop.call_later(self._timeout_s, self._on_handshake_timeout)
        try:
            self._ssl = self._ctx.wrap_bio(
                self._incoming,
                self._outgoing,
                server_side=self._server_side,
                server_hostname=self._hostname,
                session=self._offer,
            )
        except (ssl.SSLError, ValueError) as e:
            self._fail("handshake_failure", str(e))
            return
        if not self._server_side:
            self._do_handshake()

    def data_received(self, data: bytes) -> None:
        if self._state == _OPEN:
            self._incoming.write(data)
            self._read_records()
        elif self._state == _HANDSHAKE:
            if self._server_side and not self._sniffed and data:
                self._sniffed = True
                if self._looks_plaintext(data):
                    self._fail("plaintext", f"it sent {bytes(data[:16])!r}")
                    return
            self._incoming.write(data)
            self._do_handshake()
        elif self._state == _CONFIRM:
            self._incoming.write(data)
            self._confirm(data)

    def eof_received(self) -> bool:
        self._tcp_eof = True
        if self._state in (_HANDSHAKE, _CONFIRM):
            self._fail("eof", "")
            return False
        if self._state == _FAILED:
            return False
        if not self._eof_in:  # FIN without close_notify: the stream may be truncated
            self.error = ConnectionResetError(
                f"TLS connection with {self.peername} ended without close_notify"
            )
            return False
        return not self._eof_out  # keep sending until we have sent our close_notify

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if not self.handshake.done():
            self._lost = True
            self._fail("reset" if exc is not None else "eof", str(exc or ""))
        super().connection_lost(exc)

    # -- Side --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._state != _OPEN or self._eof_out or self._lost:
            return
        ssl_write = self._ssl.write  # type: ignore[union-attr]
        try:
            if len(data) <= WRITE_CHUNK:
                ssl_write(data)
                self._flush()
                return
            view = memoryview(data)
            for i in range(0, len(data), WRITE_CHUNK):
                ssl_write(view[i : i + WRITE_CHUNK])
                self._flush()
        except ssl.SSLError as e:
            self._broken(e)

    def write_eof(self) -> None:
        if self._state != _OPEN or self._eof_out or self._lost:
            return
        if self._incoming.pending:  # unwrap() would discard complete records still in the BIO
            self._read_records()
            if self._eof_out:  # reading broke the connection
                return
        self._eof_out = True
        try:
            self._ssl.unwrap()  # type: ignore[union-attr]  # sends close_notify
        except ssl.SSLWantReadError:  # the peer's close_notify has not come yet: fine
            pass
        except ssl.SSLError as e:
            self._broken(e)
            return
        self._flush()
        if self._eof_in:
            self.transport.close()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if self.transport is not None and not (
            self._lost or self._tcp_eof or self._peer is None or self._state != _OPEN
        ):
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is None or self._lost:
            return
        self._closing_during_handshake()
        if self._state == _OPEN and not self._eof_out:
            self.write_eof()
        self.transport.close()

    def abort(self) -> None:
        self._closing_during_handshake()
        self._eof_out = True  # and no close_notify: the peer sees a reset
        super().abort()

    def get_write_buffer_size(self) -> int:
        return super().get_write_buffer_size() + self._outgoing.pending

    # -- handshake ---------------------------------------------------------------------

    @staticmethod
    def _looks_plaintext(data: bytes) -> bool:
        if not data:
            return False
        return data[0] != _TLS_HANDSHAKE_RECORD or (len(data) > 1 and data[1] != 0x03)

    def _do_handshake(self) -> None:
        try:
            self._ssl.do_handshake()  # type: ignore[union-attr]
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as e:
            self._flush()  # the alert tells the peer why
            self._fail_ssl(e)
            return
        if self._server_side:
            if self._hold:
                self._held = True  # the ticket stays in the outgoing BIO until accept()
            else:
                self._flush()
            self._opened()
            if self._incoming.pending:  # the client's first data came with its Finished
                self._read_records()
        else:
            self._flush()
            self._state = _CONFIRM

    def _confirm(self, data: bytes) -> None:
        """Client: the server's first record after the handshake is a ticket or an alert."""
        if len(self._confirm_head) < 5:
            self._confirm_head += data[: 5 - len(self._confirm_head)]
        self._confirm_seen += len(data)
        self._read_records()  # an alert raises here and fails the handshake
        head = self._confirm_head
        if (
            self._state == _CONFIRM
            and len(head) == 5
            and self._confirm_seen >= 5 + int.from_bytes(head[3:5], "big")
        ):
            self._opened()  # a whole record went through OpenSSL without an error

    def _opened(self) -> None:
        self._state = _OPEN
        self._cancel_timer()
        if self._peer is None:
            self.pause_reading()  # until attach
        if not self.handshake.done():
            self.handshake.set_result(None)

    def _closing_during_handshake(self) -> None:
        if self._state in (_HANDSHAKE, _CONFIRM):
            self._fail("closed", "this side closed the connection during the handshake")

    def _on_handshake_timeout(self) -> None:
        self._timer = None
        if self._state in (_HANDSHAKE, _CONFIRM):
            self._fail("timeout", f"no handshake within {self._timeout_s:g} s")

    def _fail_ssl(self, e: ssl.SSLError) -> None:
        code = getattr(e, "verify_code", None)
        detail = getattr(e, "verify_message", None) or (e.reason or str(e)).lower()
        self._fail(handshake_reason(e.reason, code), detail.replace("_", " "), e)

    def _fail(self, reason: str, detail: str, cause: BaseException | None = None) -> None:
        self._state = _FAILED
        self._cancel_timer()
        if self.handshake.done():
            return
        peer = _addr(self.peername)
        message = f"TLS handshake with {peer} failed ({reason})"
        if detail:
            message += f": {detail}"
        if hint := failure_hint(reason):
            message += f"; {hint}"
        err = TlsHandshakeError(message, reason=reason, peer=peer)
        err.__cause__ = cause
        self.error = err
        self.handshake.set_exception(err)
        # Marked as seen: a refused scanner is routine, not a "never retrieved" traceback.
        # Whoever awaits the future still gets the error; it is also in ``error``.
        self.handshake.exception()
        if self.transport is not None and not self._lost:
            self.transport.close()  # flushes the alert, if any

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- application data ----------------------------------------------------------------

    def _read_records(self) -> None:
        """Decrypt everything complete in the incoming BIO; deliver it in large chunks."""
        view = _scratch_view()
        # With a buffer, read() returns a count (typeshed says bytes).
        read: typing.Callable[[int, memoryview], int] = self._ssl.read  # type: ignore[union-attr,assignment]
        n = 0
        eof = False
        err: ssl.SSLError | None = None
        while True:
            if n >= READ_CHUNK:
                self._deliver(bytes(view[:n]))
                n = 0
            try:
                got = read(_RECORD, view[n:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError as e:
                err = e
                break
            if not got:
                eof = True
                break
            n += got
        if n:
            self._deliver(bytes(view[:n]))
        if self._outgoing.pending:  # e.g. a KeyUpdate answer
            self._flush()
        if err is not None:
            if self._state == _CONFIRM:
                self._fail_ssl(err)
            else:
                self._broken(err)
        elif eof:
            self._on_close_notify()

    def _deliver(self, data: bytes) -> None:
        peer = self._peer
        if peer is not None:
            peer.on_data(self, data)
            return
        if self._state == _OPEN:  # not while confirming: the ticket must still be read
            self.pause_reading()
        self._keep_early(data)

    def _on_close_notify(self) -> None:
        if self._eof_in:
            return
        self._eof_in = True
        if self._state == _CONFIRM:  # closed before the server said anything: refused
            self._fail(
                "refused",
                "the server refused this connection after the handshake (identity or policy)",
            )
            return
        if self._peer is not None:
            self._peer.on_eof(self)
        if self._eof_out and self.transport is not None:
            self.transport.close()  # both directions are done

    def _broken(self, e: ssl.SSLError) -> None:
        """A TLS error after the handshake: the connection cannot go on."""
        if self.error is None:
            self.error = ConnectionResetError(f"TLS error with {self.peername}: {e}")
        self.abort()

    def accept(self) -> None:
        """Server: the caller passed every check; let it see the handshake complete."""
        self._held = False
        self._flush()

    def refuse(self) -> None:
        """Server: turn the caller away cleanly, so a client sidecar counts a refusal rather
        than a success. The held ticket cannot be dropped (its records advanced the
        sequence numbers), so ticket and close_notify leave in one write: the client reads
        both in one go and sees the close_notify before it would confirm the handshake."""
        self._held = False
        if self._state == _OPEN and not self._eof_out and not self._lost:
            self._eof_out = True
            # SSLWantReadError: the peer's close_notify has not come (and will not).
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()  # type: ignore[union-attr]
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        if self._held:
            return
        data = self._outgoing.read()
        if data and self.transport is not None:
            try:  # noqa: SIM105 -- hot path: try is free, contextlib.suppress is not
                self.transport.write(data)
            except RuntimeError:  # the handle just closed; connection_lost is on its way
                pass


def _addr(peername: typing.Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername) if peername is not None else "an unknown peer"
