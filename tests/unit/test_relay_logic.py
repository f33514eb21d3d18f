"""The relay's decisions with fake sides on a paused clock: who is written, paused,
half-closed, closed or reset, and when the idle timer fires. No sockets, no event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sidecar import relay as relay_mod
from sidecar.relay import PlainSide, Relay, RelayStats
from sidecar.tls import handshake_reason


class FakeFuture:
    def __init__(self) -> None:
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, _: object) -> None:
        assert not self._done, "a future resolved twice"
        self._done = True


class FakeTimer:
    def __init__(self, when: float, fn: Callable[[], object]) -> None:
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """time(), call_later() and create_future(): all the relay asks of its loop."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def create_future(self) -> FakeFuture:
        return FakeFuture()

    def call_later(self, delay: float, fn: Callable[[], object]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, fn)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= end]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = timer.when
            timer.fn()
        self.now = end


class FakeSide:
    """Records what the relay asks of it; ``early`` is handed over on attach."""

    def __init__(self, name: str, *, early: bytes = b"") -> None:
        self.name = name
        self.calls: list[Any] = []
        self.written: list[bytes] = []
        self.peer: Any = None
        self.early = early

    def __repr__(self) -> str:
        return self.name

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")

    def get_write_buffer_size(self) -> int:
        return 0

    def attach(self, peer: Any) -> None:
        self.calls.append("attach")
        self.peer = peer
        if self.early:
            peer.on_data(self, self.early)


def started(idle: float | None = 300.0, **kw: Any) -> tuple[Relay, FakeSide, FakeSide, FakeLoop]:
    loop = FakeLoop()
    a, b = kw.pop("a", FakeSide("a")), kw.pop("b", FakeSide("b"))
    r = Relay(a, b, idle_timeout_s=idle, loop=loop, **kw)  # type: ignore[arg-type]
    r.start()
    return r, a, b, loop


def test_start_attaches_both_and_resumes_reading() -> None:
    _, a, b, _ = started()
    assert a.calls == ["attach", "resume_reading"]
    assert b.calls == ["attach", "resume_reading"]


def test_data_goes_straight_across_and_is_counted() -> None:
    stats = RelayStats()
    r, a, b, _ = started(stats=stats)
    r.on_data(a, b"hello")
    r.on_data(b, b"world!")
    assert b.written == [b"hello"] and a.written == [b"world!"]
    assert (stats.bytes_a_to_b, stats.bytes_b_to_a) == (5, 6)


def test_early_data_is_relayed_on_start() -> None:
    _, _, b, _ = started(a=FakeSide("a", early=b"GET / HTTP/1.1\r\n"))
    assert b.written == [b"GET / HTTP/1.1\r\n"]


def test_a_full_write_buffer_pauses_the_other_side_until_it_drains() -> None:
    stats = RelayStats()
    r, a, b, _ = started(stats=stats)
    r.on_pause_writing(b)  # b cannot keep up: stop reading from a
    assert a.calls[-1] == "pause_reading" and stats.pauses_a == 1
    r.on_resume_writing(b)
    assert a.calls[-1] == "resume_reading"
    r.on_pause_writing(a)
    assert b.calls[-1] == "pause_reading" and stats.pauses_b == 1


def test_a_side_paused_before_start_is_not_resumed_by_start() -> None:
    loop = FakeLoop()
    a, b = FakeSide("a"), FakeSide("b")
    r = Relay(a, b, loop=loop)  # type: ignore[arg-type]
    r.on_pause_writing(b)  # b reported a full buffer while attaching
    r.start()
    assert "resume_reading" not in a.calls and "resume_reading" in b.calls


def test_eof_crosses_each_direction_on_its_own_then_both_close() -> None:
    r, a, b, _ = started()
    r.on_eof(a)
    assert b.calls[-1] == "write_eof" and "close" not in a.calls + b.calls
    r.on_data(b, b"response after the request's EOF")
    assert a.written == [b"response after the request's EOF"]
    r.on_eof(b)
    assert a.calls[-2:] == ["write_eof", "close"] and b.calls[-1] == "close"
    r.on_closed(a, None)
    r.on_closed(b, None)
    assert r.done.done() and r.reason == "eof"


def test_a_reset_on_one_side_resets_the_other() -> None:
    r, a, b, _ = started()
    r.on_closed(a, ConnectionResetError())
    assert b.calls[-1] == "abort" and r.reason == "reset"
    assert not r.done.done()
    r.on_closed(b, None)
    assert r.done.done()


def test_a_clean_close_on_one_side_closes_the_other_gracefully() -> None:
    r, a, b, _ = started()
    r.on_closed(b, None)
    assert a.calls[-1] == "close" and r.reason == "closed"


def test_on_done_is_called_once_when_both_sides_are_closed() -> None:
    seen: list[Relay] = []
    r, a, b, loop = started(on_done=seen.append)
    r.on_closed(a, None)
    assert seen == []
    r.on_closed(b, None)
    r.on_closed(b, None)
    assert seen == [r]
    assert all(t.cancelled for t in loop.timers)


def test_on_done_that_raises_does_not_escape(caplog: pytest.LogCaptureFixture) -> None:
    def boom(_: Relay) -> None:
        raise ValueError("metrics broke")

    r, a, b, _ = started(on_done=boom)
    r.on_closed(a, None)
    r.on_closed(b, None)
    assert r.done.done() and "on_done callback failed" in caplog.text


def test_idle_timer_closes_both_after_no_traffic_for_the_timeout() -> None:
    r, a, b, loop = started(idle=10.0)
    loop.advance(4.0)
    r.on_data(a, b"x")  # at t=4: the deadline moves to 14
    loop.advance(9.0)  # t=13: the timer fired at 10, found traffic, re-armed for 14
    assert "close" not in a.calls
    loop.advance(1.5)
    assert a.calls[-1] == "close" and b.calls[-1] == "close" and r.reason == "idle"


def test_idle_timer_is_one_timer_not_one_per_chunk() -> None:
    r, a, _, loop = started(idle=10.0)
    for _ in range(1000):
        r.on_data(a, b"x")
    assert len([t for t in loop.timers if not t.cancelled]) == 1


def test_no_idle_timeout_means_no_timer() -> None:
    _, a, _, loop = started(idle=None)
    loop.advance(10_000)
    assert loop.timers == [] and "close" not in a.calls


def test_a_close_that_cannot_flush_becomes_an_abort_after_the_grace() -> None:
    r, a, b, loop = started(idle=None)
    r.close()
    assert a.calls[-1] == "close" and b.calls[-1] == "close"
    loop.advance(relay_mod.CLOSE_GRACE_S + 1)
    assert a.calls[-1] == "abort" and b.calls[-1] == "abort"


def test_write_eof_is_not_sent_to_a_side_that_is_already_gone() -> None:
    r, a, b, _ = started()
    r.on_closed(b, ConnectionResetError())
    r.on_eof(a)
    assert "write_eof" not in b.calls


# ---- PlainSide before the relay starts (a fake transport, no socket) --------------------


class FakeTransport:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.buffered = 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 15001)}.get(name)

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        self.calls.append(f"limits {high} {low}")

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def write(self, data: bytes) -> None:
        self.buffered += len(data)

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def abort(self) -> None:
        self.calls.append("abort")

    def close(self) -> None:
        self.calls.append("close")

    def get_write_buffer_size(self) -> int:
        return self.buffered


class FakePeer:
    """Records what a side reports to its relay."""

    def __init__(self) -> None:
        self.got: list[Any] = []

    def on_data(self, side: object, data: bytes) -> None:
        self.got.append(data)

    def on_eof(self, side: object) -> None:
        self.got.append("eof")

    def on_closed(self, side: object, exc: BaseException | None) -> None:
        self.got.append(("closed", exc))

    def on_pause_writing(self, side: object) -> None:
        self.got.append("pause_writing")

    def on_resume_writing(self, side: object) -> None:
        self.got.append("resume_writing")


def plain_side() -> tuple[PlainSide, FakeTransport]:
    side = PlainSide(loop=FakeLoop())  # type: ignore[arg-type]
    t = FakeTransport()
    side.connection_made(t)  # type: ignore[arg-type]
    return side, t


def test_plain_side_keeps_reading_paused_and_buffers_until_attach() -> None:
    side, t = plain_side()
    assert "pause_reading" in t.calls
    side.data_received(b"early ")  # uvloop may deliver after pause_reading in connection_made
    side.data_received(b"bytes")
    side.pause_writing()
    side.eof_received()
    side.connection_lost(None)
    peer = FakePeer()
    side.attach(peer)
    assert peer.got == [b"early bytes", "pause_writing", "eof", ("closed", None)]


def test_plain_side_resets_a_client_that_floods_before_the_relay_starts() -> None:
    side, t = plain_side()
    chunk = b"x" * 65536
    for _ in range(relay_mod.MAX_EARLY_BYTES // len(chunk) + 1):
        side.data_received(chunk)
    assert t.calls[-1] == "abort"
    assert isinstance(side.error, ConnectionError)


def test_plain_side_never_resumes_reading_after_eof() -> None:
    side, t = plain_side()
    side.attach(FakePeer())
    side.eof_received()
    side.resume_reading()
    assert "resume_reading" not in t.calls


def test_plain_side_write_eof_happens_once_and_stops_writes() -> None:
    side, t = plain_side()
    side.write_eof()
    side.write_eof()
    side.write(b"late")
    assert t.calls.count("write_eof") == 1 and t.buffered == 0


# ---- handshake failure names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("ssl_reason", "verify_code", "want"),
    [
        ("CERTIFICATE_VERIFY_FAILED", 20, "unknown_ca"),
        ("CERTIFICATE_VERIFY_FAILED", 19, "unknown_ca"),
        ("CERTIFICATE_VERIFY_FAILED", 10, "expired"),
        ("CERTIFICATE_VERIFY_FAILED", 9, "not_yet_valid"),
        ("CERTIFICATE_VERIFY_FAILED", 26, "bad_certificate"),
        ("TLSV1_ALERT_UNKNOWN_CA", None, "unknown_ca"),
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", None, "expired"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", None, "bad_certificate"),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", None, "no_certificate"),
        ("PEER_DID_NOT_RETURN_A_CERTIFICATE", None, "no_certificate"),
        ("WRONG_VERSION_NUMBER", None, "plaintext"),
        ("HTTP_REQUEST", None, "plaintext"),
        ("UNSUPPORTED_PROTOCOL", None, "protocol_version"),
        ("TLSV1_ALERT_PROTOCOL_VERSION", None, "protocol_version"),
        ("SOMETHING_NEW", None, "handshake_failure"),
        (None, None, "handshake_failure"),
    ],
)
def test_handshake_reason(ssl_reason: str | None, verify_code: int | None, want: str) -> None:
    assert handshake_reason(ssl_reason, verify_code) == want
