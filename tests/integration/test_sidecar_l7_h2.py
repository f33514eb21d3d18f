"""HTTP/2 and gRPC through two real sidecars: a grpcio client (and curl, h2load, raw
frames) talks h2c to the web sidecar's explicit upstreams; the web sidecar carries each
stream over pooled h2/mTLS connections to the orders sidecars (two grpc.aio servers,
`shop/orders:8080` declared grpc) or the pages sidecar (an h2c server, `shop/pages:8080`
declared http), which pass it on to their app over h2c."""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import json
import os
import signal
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from l7_helpers import (
    H2_REPLICAS,
    H2Mesh,
    h2_policy,
    log_lines,
    start_h2_mesh,
    stop_h2_mesh,
    wait_for,
)
from sidecar_helpers import Sidecar, metric
from test_h2conn import PREFACE, App, Raw, connect, request, serve

from sidecar.h2_limits import H2Limits
from sidecar.h2_pool import H2Pool
from sidecar.relay import PlainSide, Side

pytestmark = pytest.mark.integration
T = TypeVar("T")
OPTIONS = [("grpc.enable_http_proxy", 0)]
MiB = 1 << 20


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[H2Mesh]:
    m = start_h2_mesh(tmp_path_factory.mktemp("h2"))
    try:
        yield m
    finally:
        stop_h2_mesh(m)


def tag() -> str:
    return uuid.uuid4().hex[:12]


def run(scenario: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await scenario()

    return asyncio.run(bounded())


def with_channel(
    mesh: H2Mesh, body: Callable[[grpc.aio.Channel], Awaitable[T]], timeout: float = 60.0
) -> T:
    """Run ``body`` with a gRPC channel to the web sidecar's local port for shop/orders."""

    async def scenario() -> T:
        async with grpc.aio.insecure_channel(mesh.target, options=OPTIONS) as ch:
            return await body(ch)

    return run(scenario, timeout)


def md(t: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return (("x-tag", t), *extra.items())


def curl(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sidecar_metric(sc: Sidecar, name: str, **labels: str) -> float:
    return metric(sc.metrics(), name, **labels)


# ---- gRPC through the mesh ----------------------------------------------------------------------


def test_grpc_unary_metadata_trailers_and_status_codes_cross_the_mesh(mesh: H2Mesh) -> None:
    async def body(ch: grpc.aio.Channel) -> None:
        unary = ch.unary_unary("/test.Echo/Unary")
        call = unary(b"hello", timeout=10, metadata=md(tag()))
        assert await call == b"olleh"
        head = dict(tuple(await call.initial_metadata()))
        assert head["x-replica"] in ("orders-0", "orders-1")
        assert head["x-meshlet-attempts"] == "1"
        assert ("x-trailer", "yes") in tuple(await call.trailing_metadata())
        assert await call.code() == grpc.StatusCode.OK
        # Round robin per call, on one client connection.
        many = await asyncio.gather(*(unary(b"%d" % i, timeout=10) for i in range(40)))
        assert many == [(b"%d" % i)[::-1] for i in range(40)]
        replicas = collections.Counter()
        for _ in range(10):
            c = unary(b"x", timeout=10)
            await c
            replicas[dict(tuple(await c.initial_metadata()))["x-replica"]] += 1
        assert replicas == {"orders-0": 5, "orders-1": 5}
        # The app's status and message reach the client unchanged.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Missing")(b"x", timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no such order"
        # Trace context: continued with a new span, request id kept, the caller appended.
        incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        seen = json.loads(
            await ch.unary_unary("/test.Echo/Whoami")(
                b"",
                timeout=10,
                metadata=(
                    ("traceparent", incoming),
                    ("tracestate", "v=1"),
                    ("x-request-id", "rid-7"),
                ),
            )
        )["metadata"]
        version, trace_id, span, flags = seen["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
        assert span != "b7ad6b7169203331"
        assert seen["tracestate"] == "v=1" and seen["x-request-id"] == "rid-7"
        assert seen["x-forwarded-for"] == "127.0.0.1"
        fresh = json.loads(await ch.unary_unary("/test.Echo/Whoami")(b"", timeout=10))
        assert uuid.UUID(fresh["metadata"]["x-request-id"]).version == 4
        assert "tracestate" not in fresh["metadata"]
        # grpc-timeout: what is left of the 10 s (grpc-core rounds its own value up a little)
        assert 8.0 < fresh["time_remaining"] <= 10.2

    with_channel(mesh, body)


def test_grpc_bidi_server_and_client_streaming_and_large_messages(mesh: H2Mesh) -> None:
    async def body(ch: grpc.aio.Channel) -> None:
        bidi = ch.stream_stream("/test.Echo/Bidi")(timeout=20)
        for i in range(100):  # interleaved: each answer before the next message
            await bidi.write(b"m%d" % i)
            assert await bidi.read() == b"echo:m%d" % i
        await bidi.done_writing()
        assert await bidi.read() == grpc.aio.EOF
        assert await bidi.code() == grpc.StatusCode.OK

        items = [m async for m in ch.unary_stream("/test.Echo/ServerStream")(b"500", timeout=20)]
        assert items == [b"item-%d" % i for i in range(500)]

        async def messages() -> AsyncIterator[bytes]:
            for i in range(200):
                yield b"c" * i

        total = await ch.stream_unary("/test.Echo/ClientStream")(messages(), timeout=20)
        assert total == b"200 messages, %d bytes" % sum(range(200))

        big = os.urandom(3 * MiB)  # beyond every flow-control window, both ways
        assert await ch.unary_unary("/test.Echo/Unary")(big, timeout=20) == big[::-1]

    with_channel(mesh, body)


def test_a_client_deadline_cancels_the_call_at_the_server(mesh: H2Mesh) -> None:
    t = tag()

    async def body(ch: grpc.aio.Channel) -> float:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Slow")(b"2", timeout=0.3, metadata=md(t))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return time.monotonic() - started

    took = with_channel(mesh, body)
    assert took < 1.0
    wait_for(
        lambda: sum(mesh.stats(name, t)["cancelled"] for name, _ in H2_REPLICAS) == 1,
        "the server saw its call cancelled",
        timeout=5,
    )


def test_a_grpc_deadline_after_the_response_head_ends_the_call_with_deadline_exceeded(
    mesh: H2Mesh,
) -> None:
    """A client that does not enforce its own grpc-timeout (raw HTTP/2): the call's
    response has begun when the 0.6 s pass, and it ends with grpc-status 4 all the same."""

    async def scenario() -> tuple[float, dict[bytes, bytes]]:
        client = await connect(mesh.grpc_local)
        head = [(k.encode(), v.encode()) for k, v in GRPC_HEAD]
        head[2] = (b":path", b"/test.Echo/Bidi")
        started = time.monotonic()
        stream = client.open_stream([*head, (b"grpc-timeout", b"600m")])
        stream.send_data(b"\x00\x00\x00\x00\x03one")  # one gRPC message; the call goes on
        response = dict(await stream.response())
        assert response[b":status"] == b"200" and b"grpc-status" not in response
        body = b""
        while (chunk := await stream.read()) is not None:
            body += chunk
        took = time.monotonic() - started
        await client.shutdown(1.0)
        assert body == b"\x00\x00\x00\x00\x08echo:one"
        return took, dict(stream.trailers or [])

    took, trailers = run(scenario)
    assert trailers[b"grpc-status"] == b"4"
    assert 0.5 <= took < 2.0


def test_a_route_timeout_answers_deadline_exceeded_and_resets_the_upstream(mesh: H2Mesh) -> None:
    """No deadline from the client: the route's 0.5 s timeout is the sidecar's; at expiry it
    answers DEADLINE_EXCEEDED (plain HTTP/2: 504) and resets the upstream stream, which the
    apps behind the other sidecar see as a cancellation."""
    t = tag()
    before = sidecar_metric(mesh.web, "meshlet_request_timeouts_total", direction="outbound",
                            service="shop/orders", route="timeout")  # fmt: skip

    async def body(ch: grpc.aio.Channel) -> float:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Slow")(b"3", metadata=md(t, **{"x-route": "timeout"}))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return time.monotonic() - started

    took = with_channel(mesh, body)
    assert 0.45 <= took < 1.5
    wait_for(
        lambda: sum(mesh.stats(name, t)["cancelled"] for name, _ in H2_REPLICAS) == 1,
        "the server saw its call cancelled",
        timeout=5,
    )
    after = sidecar_metric(mesh.web, "meshlet_request_timeouts_total", direction="outbound",
                           service="shop/orders", route="timeout")  # fmt: skip
    assert after == before + 1

    pt = tag()
    started = time.monotonic()
    out = curl("-i", "-H", f"x-tag: {pt}", f"http://127.0.0.1:{mesh.http_local}/slow?5")
    assert out.stdout.startswith("HTTP/2 504"), out
    assert "x-meshlet-attempts: 1" in out.stdout
    assert time.monotonic() - started < 2.0
    pages = mesh.apps["pages-0"]
    wait_for(lambda: f"reset {pt}" in pages.output(), "the h2c app saw its stream reset", 5)


def test_unavailable_from_one_replica_is_retried_on_the_other(mesh: H2Mesh) -> None:
    """Every call is replayed from the sidecar's copy of its body (40 KiB: bytes and
    flow-control credit are not counted twice); one over 64 KiB is not held, so its
    UNAVAILABLE reaches the client."""
    t, big = tag(), tag()
    before = sidecar_metric(mesh.web, "meshlet_retries_total", service="shop/orders", route="all")
    body = os.urandom(40 * 1024)
    want = b"orders-1:" + hashlib.sha256(body).hexdigest().encode()
    fail_on = md(t, **{"x-fail-on": "orders-0"})

    async def scenario(ch: grpc.aio.Channel) -> list[tuple[bytes, str]]:
        flaky = ch.unary_unary("/test.Echo/Flaky")
        out = []
        for _ in range(20):
            call = flaky(body, timeout=10, metadata=fail_on)
            out.append(
                (await call, dict(tuple(await call.initial_metadata()))["x-meshlet-attempts"])
            )
        with pytest.raises(grpc.aio.AioRpcError) as err:  # 100 KiB: no copy, no retry
            both = md(big, **{"x-fail-on": "orders-0,orders-1"})
            await flaky(os.urandom(100 * 1024), timeout=10, metadata=both)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "try another replica"
        return out

    results = with_channel(mesh, scenario)
    assert [answer for answer, _ in results] == [want] * 20  # every call succeeded, intact
    attempts = collections.Counter(a for _, a in results)
    # (Round robin over two: the retry takes the next turn, so each call starts at orders-0.)
    assert set(attempts) <= {"1", "2"} and attempts["2"] >= 5, attempts
    assert mesh.stats("orders-0", t)["tag"] == attempts["2"]  # each tried there once
    assert sum(mesh.stats(name, big)["tag"] for name, _ in H2_REPLICAS) == 1
    after = sidecar_metric(mesh.web, "meshlet_retries_total", service="shop/orders", route="all")
    assert after - before == attempts["2"]


def test_many_concurrent_calls_share_one_mtls_connection_per_replica(mesh: H2Mesh) -> None:
    opened = {"direction": "outbound", "service": "shop/orders"}
    before = sidecar_metric(mesh.web, "meshlet_http2_pool_connections_opened_total", **opened)

    async def body(ch: grpc.aio.Channel) -> list[bytes]:
        slow = ch.unary_unary("/test.Echo/Slow")
        return list(await asyncio.gather(*(slow(b"0.5", timeout=20) for _ in range(50))))

    started = time.monotonic()
    assert with_channel(mesh, body) == [b"slept"] * 50
    assert time.monotonic() - started < 5.0  # they ran side by side, not one after another
    text = mesh.web.metrics()
    assert metric(text, "meshlet_http2_pool_connections", **opened) <= 2
    assert metric(text, "meshlet_http2_pool_connections_opened_total", **opened) - before <= 2
    for name, _ in H2_REPLICAS:  # each replica's sidecar: one h2c connection to its app
        inbound = {"direction": "inbound", "service": "shop/orders"}
        assert sidecar_metric(mesh.sidecars[name], "meshlet_http2_pool_connections", **inbound) == 1


# ---- plain HTTP/2 on a port declared http -------------------------------------------------------


def test_curl_prior_knowledge_and_h2load_through_an_http_port(mesh: H2Mesh, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{mesh.http_local}"
    out = curl("-o", "-", "-w", "\n%{http_code} h%{http_version}", f"{url}/page?q=1")
    assert out.returncode == 0, out.stderr
    payload, _, status = out.stdout.rpartition("\n")
    assert status == "200 h2"
    seen = json.loads(payload)
    assert seen["replica"] == "pages-0" and seen["path"] == "/page?q=1"
    assert dict(seen["headers"])["x-forwarded-for"] == "127.0.0.1"

    blob = os.urandom(2 * MiB + 5)
    (tmp_path / "blob").write_bytes(blob)
    out = curl("--data-binary", f"@{tmp_path / 'blob'}", "-D", str(tmp_path / "head"),
               "-o", str(tmp_path / "back"), f"{url}/echo")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        hashlib.sha256((tmp_path / "back").read_bytes()).digest() == hashlib.sha256(blob).digest()
    )
    assert f"x-echo-bytes: {len(blob)}" in (tmp_path / "head").read_text()

    out = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "10", f"{url}/h2load"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2000 succeeded, 0 failed, 0 errored" in out.stdout, out.stdout
    assert "status codes: 2000 2xx" in out.stdout, out.stdout


def split(frame: HeadersFrame, size: int = 16 * 1024) -> list[Frame]:
    """A HEADERS frame as HEADERS + CONTINUATION frames of at most ``size`` bytes."""
    block = frame.data
    parts = [block[i : i + size] for i in range(0, len(block), size)]
    end_stream = ["END_STREAM"] if "END_STREAM" in frame.flags else []
    out: list[Frame] = [HeadersFrame(frame.stream_id, data=parts[0], flags=end_stream)]
    out += [ContinuationFrame(frame.stream_id, data=p) for p in parts[1:]]
    out[-1].flags.add("END_HEADERS")
    return out


def test_header_limits_at_the_edge_and_room_for_the_mesh_fields(mesh: H2Mesh) -> None:
    """100 fields (pseudo-headers included) pass the outbound and, with the four fields it
    adds, the inbound; 101 fields or 61 KiB of headers reset that stream at the outbound."""
    pages = mesh.apps["pages-0"]

    async def scenario() -> dict[int, int]:
        raw = await Raw.connect(mesh.http_local)
        big = raw.headers(5, "/limits/big", extra=[("x-big", "a" * (61 * 1024))])
        raw.send(
            raw.headers(1, "/limits/ok", extra=[(f"x-h{i}", "v") for i in range(96)]),
            raw.headers(3, "/limits/many", extra=[(f"x-h{i}", "v") for i in range(97)]),
            *split(big),  # frames of at most 16 KiB (a bigger one ends the connection)
        )
        await raw.read_until(
            lambda r: any(isinstance(f, DataFrame) and f.stream_id == 1 for f in r.frames)
        )
        await raw.read_until(lambda r: len(r.resets()) >= 2)
        raw.close()
        return raw.resets()

    assert run(scenario) == {3: ErrorCodes.PROTOCOL_ERROR, 5: ErrorCodes.PROTOCOL_ERROR}
    wait_for(lambda: "request /limits/ok" in pages.output(), "the good request reached the app")
    assert "/limits/many" not in pages.output() and "/limits/big" not in pages.output()


# ---- floods at the app-facing listener ------------------------------------------------------------

GRPC_HEAD = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/test.Echo/Unary"),
    (":authority", "orders"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def _rapid_reset(raw: Raw) -> list[Frame | bytes]:
    frames: list[Frame | bytes] = []
    for i in range(1000):
        sid = 2 * i + 1
        block = raw.enc.encode(GRPC_HEAD)
        frames += [
            HeadersFrame(sid, data=block, flags=["END_HEADERS"]),
            RstStreamFrame(sid, error_code=8),
        ]
    return frames


def _continuation(raw: Raw) -> list[Frame | bytes]:
    first = HeadersFrame(1, data=raw.enc.encode(GRPC_HEAD))  # no END_HEADERS
    return [first, *[ContinuationFrame(1, data=b"\x00" * 1024)] * 200]


def _hpack_bomb(raw: Raw) -> list[Frame | bytes]:
    # One 3.9 KB entry in the dynamic table, then referenced 100 times: ~400 KB decoded.
    block = raw.enc.encode([*GRPC_HEAD, ("x-bomb", "a" * 3900)]) + bytes([0x80 | 62]) * 100
    return [HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"])]


FLOODS: dict[str, tuple[Callable[[Raw], list[Frame | bytes]], tuple[int, ...]]] = {
    "rapid_reset": (_rapid_reset, (ErrorCodes.ENHANCE_YOUR_CALM,)),
    "continuation_flood": (
        _continuation,
        (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.PROTOCOL_ERROR),
    ),
    "settings_flood": (lambda raw: [SettingsFrame(0)] * 300, (ErrorCodes.ENHANCE_YOUR_CALM,)),
    "ping_flood": (
        lambda raw: [PingFrame(0, opaque_data=b"12345678")] * 300,
        (ErrorCodes.ENHANCE_YOUR_CALM,),
    ),
    "hpack_bomb": (_hpack_bomb, (ErrorCodes.ENHANCE_YOUR_CALM,)),
}


@pytest.mark.parametrize("reason", list(FLOODS))
def test_floods_get_goaway_and_nothing_reaches_the_app(mesh: H2Mesh, reason: str) -> None:
    build, codes = FLOODS[reason]
    arrived = mesh.arrived()
    labels = {"direction": "outbound", "reason": reason}
    before = sidecar_metric(mesh.web, "meshlet_http2_connection_errors_total", **labels)

    async def scenario() -> None:
        raw = await Raw.connect(mesh.grpc_local)
        raw.send(*build(raw))
        await raw.closed(10)
        goaway = raw.goaway()
        assert goaway is not None and goaway.error_code in codes, raw.frames[-3:]
        assert raw.eof
        raw.close()
        # The sidecar goes on serving everyone else.
        async with grpc.aio.insecure_channel(mesh.target, options=OPTIONS) as ch:
            assert await ch.unary_unary("/test.Echo/Unary")(b"after", timeout=10) == b"retfa"

    run(scenario)
    assert mesh.arrived() == arrived + 1  # only the call made afterwards
    after = sidecar_metric(mesh.web, "meshlet_http2_connection_errors_total", **labels)
    assert after == before + 1


def test_the_inbound_side_holds_the_same_limits_for_a_mesh_caller(mesh: H2Mesh) -> None:
    """A caller with a valid mesh certificate that speaks h2 itself (no sidecar in front
    of it) is held to the same limits at the inbound: floods get GOAWAY, nothing reaches
    the app, and the inbound goes on serving."""
    target = mesh.sidecars["orders-1"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_cert_chain(mesh.web.cert_dir / "cert.pem", mesh.web.cert_dir / "key.pem")
    ctx.load_verify_locations(mesh.cp.data_dir / "ca" / "bundle.pem")
    ctx.set_alpn_protocols(["h2"])
    arrived = mesh.stats("orders-1")["arrived"]

    async def flood(reason: str) -> None:
        build, codes = FLOODS[reason]
        reader, writer = await asyncio.open_connection(
            target.address, target.inbound_port, ssl=ctx, server_hostname=None
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        raw = Raw(reader, writer)
        raw.send(PREFACE, SettingsFrame(0), *build(raw))
        await raw.closed(10)
        goaway = raw.goaway()
        assert goaway is not None and goaway.error_code in codes, (reason, raw.frames[-3:])
        raw.close()

    async def scenario() -> None:
        for reason in ("rapid_reset", "ping_flood", "hpack_bomb"):
            await flood(reason)
        async with grpc.aio.insecure_channel(mesh.target, options=OPTIONS) as ch:
            for _ in range(2):  # round robin: one of them goes to orders-1
                assert await ch.unary_unary("/test.Echo/Unary")(b"ok", timeout=10) == b"ko"

    run(scenario)
    assert mesh.stats("orders-1")["arrived"] == arrived + 1
    for reason in ("rapid_reset", "ping_flood", "hpack_bomb"):
        assert sidecar_metric(target, "meshlet_http2_connection_errors_total",
                              direction="inbound", reason=reason) >= 1  # fmt: skip


# ---- the breaker, observability, draining ----------------------------------------------------------


def test_an_overflowing_breaker_answers_unavailable_at_once_with_the_reason(mesh: H2Mesh) -> None:
    policy = h2_policy()
    policy["circuit_breaker"] = {"max_requests": 1}
    mesh.set_policy(policy)
    try:

        async def body(ch: grpc.aio.Channel) -> tuple[grpc.aio.AioRpcError, float]:
            hold = ch.unary_unary("/test.Echo/Slow")(b"2", timeout=10)
            await asyncio.sleep(0.5)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
            took = time.monotonic() - started
            assert await hold == b"slept"
            return err.value, took

        err, took = with_channel(mesh, body)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and took < 1.0  # the holder: 2 s
        assert "circuit breaker open" in (err.details() or "")
        metadata = dict(tuple(err.trailing_metadata() or ()) + tuple(err.initial_metadata() or ()))
        assert metadata["x-meshlet-overflow"] == "requests"
        assert sidecar_metric(mesh.web, "meshlet_breaker_overflow_total", service="shop/orders",
                              kind="requests") >= 1  # fmt: skip
    finally:
        mesh.set_policy(h2_policy())


def test_streams_beyond_one_connection_overflow_max_connections_at_once(mesh: H2Mesh) -> None:
    """Envoy's HTTP/2 semantics: max_connections counts connections to the service, and
    many streams share one. With max_connections 1 the pages sidecar's connection takes
    its 100 streams (its SETTINGS_MAX_CONCURRENT_STREAMS); a stream that would need one
    more connection is answered 503 at once, saying why, and never reaches the app."""
    policy = h2_policy()
    policy["circuit_breaker"] = {"max_connections": 1}
    mesh.set_policy(policy, "pages")
    t = tag()
    try:

        async def scenario() -> list[tuple[int, dict[bytes, bytes]]]:
            # 240 streams: more than two connections' worth, should earlier tests have
            # left more than one pooled connection open (they are not closed by the limit)
            clients = [await connect(mesh.http_local) for _ in range(3)]
            head = [*request("/slow?0.2"), (b"x-tag", t.encode())]
            streams = [c.open_stream(head, end_stream=True) for c in clients for _ in range(80)]
            out = []
            for stream in streams:
                answer = dict(await stream.response())
                while await stream.read() is not None:
                    pass
                out.append((int(answer[b":status"]), answer))
            for c in clients:
                await c.shutdown(1.0)
            return out

        answers = run(scenario)
        statuses = collections.Counter(status for status, _ in answers)
        assert set(statuses) <= {200, 503} and statuses[503] >= 1 and statuses[200] >= 100, statuses
        for status, head in answers:
            if status == 503:
                assert head[b"x-meshlet-overflow"] == b"connections", head
        reached = mesh.apps["pages-0"].output().count(f"request /slow?0.2 {t}\n")
        assert reached == statuses[200]  # the overflowed ones never reached the app
        assert sidecar_metric(mesh.web, "meshlet_breaker_overflow_total", service="shop/pages",
                              kind="connections") >= statuses[503]  # fmt: skip
    finally:
        mesh.set_policy(h2_policy(), "pages")


def test_per_try_timeouts_move_a_grpc_call_on_only_when_the_policy_allows_it(
    mesh: H2Mesh,
) -> None:
    """retries.per_try_timeout_s: the try is abandoned (its stream reset, which the server
    sees as a cancellation). A gRPC call is a POST that may have had its effect, so it
    goes again only with ``non_idempotent: true``, to a replica not yet tried; when the
    tries are spent the caller gets DEADLINE_EXCEEDED with the attempts counted."""

    async def body(ch: grpc.aio.Channel, t: str) -> tuple[grpc.aio.AioRpcError, float]:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Slow")(b"3", timeout=10, metadata=md(t))
        return err.value, time.monotonic() - started

    def attempts(err: grpc.aio.AioRpcError) -> str:
        metadata = dict(tuple(err.trailing_metadata() or ()) + tuple(err.initial_metadata() or ()))
        return str(metadata["x-meshlet-attempts"])

    try:
        for non_idempotent, tries in ((False, 1), (True, 2)):
            policy = h2_policy()
            policy["retries"] = {
                "per_try_timeout_s": 0.3, "attempts": 2, "non_idempotent": non_idempotent,
            }  # fmt: skip
            mesh.set_policy(policy)
            t = tag()
            err, took = with_channel(mesh, functools.partial(body, t=t))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
            assert "per-try timeout" in (err.details() or ""), err
            assert took < 2.5  # tries of 0.3 s, not the handler's 3 s
            assert attempts(err) == str(tries)
            calls = [mesh.stats(name, t)["tag"] for name, _ in H2_REPLICAS]
            assert sorted(calls) == ([0, 1] if tries == 1 else [1, 1])  # one try per replica
            wait_for(
                lambda t=t, calls=calls: (
                    [mesh.stats(n, t)["cancelled"] for n, _ in H2_REPLICAS] == calls
                ),
                "each try's handler cancelled when its time was up",
                timeout=5,
            )
    finally:
        mesh.set_policy(h2_policy())


def test_per_try_timeouts_retry_a_plain_http2_get_and_end_in_504(mesh: H2Mesh) -> None:
    """A GET over h2c is idempotent: after each per-try timeout its stream to the app is
    reset and it goes again; when the tries are spent the app gets 504, with the
    attempts counted."""
    policy = h2_policy()
    policy["routes"] = [{"name": "all"}]  # no route timeout: only the per-try one
    policy["retries"] = {"per_try_timeout_s": 0.2, "attempts": 2}
    mesh.set_policy(policy, "pages")
    t = tag()
    try:

        async def scenario() -> tuple[dict[bytes, bytes], bytes, float]:
            client = await connect(mesh.http_local)
            started = time.monotonic()
            stream = client.open_stream([*request("/slow?3"), (b"x-tag", t.encode())],
                                        end_stream=True)  # fmt: skip
            head = dict(await stream.response())
            body = b""
            while (chunk := await stream.read()) is not None:
                body += chunk
            took = time.monotonic() - started
            await client.shutdown(1.0)
            return head, body, took

        head, body, took = run(scenario)
        assert head[b":status"] == b"504", (head, body)
        assert head[b"x-meshlet-attempts"] == b"2"
        assert b"per-try timeout" in body
        assert took < 2.0  # two tries of 0.2 s, not the app's 3 s
        app = mesh.apps["pages-0"]
        wait_for(lambda: app.output().count(f"reset {t}\n") == 2,
                 "both tries' streams reset at the app", timeout=5)  # fmt: skip
        assert app.output().count(f"request /slow?3 {t}\n") == 2
    finally:
        mesh.set_policy(h2_policy(), "pages")


def test_one_access_log_line_per_call_on_both_sidecars_and_grpc_metrics(mesh: H2Mesh) -> None:
    request_id = f"log-{tag()}"

    async def body(ch: grpc.aio.Channel) -> None:
        await ch.unary_unary("/test.Echo/Unary")(b"logged", timeout=10,
                                                 metadata=(("x-request-id", request_id),))  # fmt: skip

    with_channel(mesh, body)

    def line(proc: Any) -> dict[str, Any]:
        found = [e for e in log_lines(proc) if e["request_id"] == request_id]
        assert len(found) == 1
        return found[0]

    wait_for(lambda: line(mesh.web), "the web sidecar's access log line")
    entry = line(mesh.web)
    assert entry["protocol"] == "HTTP/2" and entry["method"] == "POST"
    assert entry["path"] == "/test.Echo/Unary" and entry["response_code"] == 200
    assert entry["direction"] == "outbound" and entry["attempts"] == 1
    assert entry["route"] == "all" and entry["service"] == "shop/orders"
    assert entry["bytes_received"] == 11 and entry["bytes_sent"] == 11  # 5-byte frame + 6
    assert entry["destination_identity"] == "spiffe://h2.test/ns/shop/sa/orders"
    assert entry["grpc_status"] == 0
    replica = next(
        mesh.sidecars[n] for n, a in H2_REPLICAS
        if entry["upstream_host"] == f"{a}:{mesh.sidecars[n].inbound_port}"
    )  # fmt: skip
    wait_for(lambda: line(replica), "the orders sidecar's access log line")
    inbound = line(replica)
    assert inbound["direction"] == "inbound" and inbound["protocol"] == "HTTP/2"
    assert inbound["source_identity"] == "spiffe://h2.test/ns/shop/sa/web"
    assert inbound["trace_id"] == entry["trace_id"] and inbound["grpc_status"] == 0
    text = mesh.web.metrics()
    assert metric(text, "meshlet_grpc_response_total", direction="outbound",
                  service="shop/orders", route="all", grpc_status="0") >= 1  # fmt: skip
    assert metric(text, "meshlet_response_total", direction="outbound", service="shop/orders",
                  route="all", status_code="200", classification="success") >= 1  # fmt: skip


def test_sigterm_on_a_replica_lets_its_open_calls_finish(mesh: H2Mesh) -> None:
    """Draining: the orders sidecar sends GOAWAY, lets the open call finish and exits; the
    web sidecar's later calls go to the other replica (or to the restarted one)."""
    victim = mesh.sidecars["orders-0"]

    async def body(ch: grpc.aio.Channel) -> list[bytes]:
        slow = ch.unary_unary("/test.Echo/Slow")
        calls = [asyncio.ensure_future(slow(b"1", timeout=10)) for _ in range(4)]  # 2 each
        await asyncio.sleep(0.4)
        victim.signal(signal.SIGTERM)
        results = list(await asyncio.gather(*calls))
        unary = ch.unary_unary("/test.Echo/Unary")
        results += [await unary(b"next", timeout=10) for _ in range(6)]
        return results

    assert with_channel(mesh, body) == [b"slept"] * 4 + [b"txen"] * 6
    assert victim.wait(timeout=20) == 0
    new = Sidecar(
        mesh.cp, mesh.tmp, "shop/orders", victim.app_port, address=victim.address,
        name="orders-0", extra=victim.extra,
    )  # fmt: skip
    new.inbound_port, new.admin_port = victim.inbound_port, victim.admin_port
    mesh.sidecars["orders-0"] = new.start().wait_ready()
    wait_for(
        lambda: any(
            e["id"] == "orders-0" and e["health"] == "healthy"
            for c in mesh.web.json("/clusters")["clusters"]
            for e in c["endpoints"]
        ),
        "orders-0 back in the web sidecar's map",
    )


# ---- the pool of client connections ----------------------------------------------------------------


class Dials:
    """A dial function to 127.0.0.1:port that counts its calls."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0

    async def __call__(self) -> Side:
        self.count += 1
        _, side = await asyncio.get_running_loop().create_connection(
            PlainSide, "127.0.0.1", self.port
        )
        return side


def test_the_pool_shares_a_connect_and_opens_another_connection_when_one_is_full() -> None:
    async def scenario() -> None:
        app = App()
        srv = await serve(app.on_stream, limits=H2Limits(max_concurrent_streams=5))
        dial, pool = Dials(srv.port), H2Pool()
        conns = await asyncio.gather(*(pool.acquire("k", dial) for _ in range(10)))
        assert dial.count == 1 and len({id(c) for c in conns}) == 1  # one shared connect
        first = conns[0]
        done = first.open_stream(request("/"), end_stream=True)
        assert await done.read_all() == b"ok"  # the server's SETTINGS (5 streams) are in
        for _ in range(5):
            (await pool.acquire("k", dial)).open_stream(request("/hold"), end_stream=True)
        assert dial.count == 1 and not first.can_open_stream()
        second = await pool.acquire("k", dial)
        assert second is not first and dial.count == 2 and pool.count("k") == 2
        await until(lambda: len(app.held) == 5)
        for held in app.held:  # the first connection has room again: it is used first
            held.send_headers([(b":status", b"204")], end_stream=True)
        await until(lambda: first.can_open_stream())
        assert await pool.acquire("k", dial) is first
        pool.abort_all()
        srv.close()

    run(scenario)


def test_the_pool_drops_a_connection_after_goaway_and_reaps_idle_ones() -> None:
    async def scenario() -> None:
        srv = await serve(App().on_stream)
        dial, pool = Dials(srv.port), H2Pool(idle_timeout_s=0.6)
        conn = await pool.acquire("k", dial)
        await srv.wait_conn()
        await srv.conn.shutdown(1.0)  # GOAWAY(NO_ERROR): no new streams on it
        await until(lambda: conn.goaway_received is not None)
        assert pool.ready("k") is None
        fresh = await pool.acquire("k", dial)
        assert fresh is not conn and dial.count == 2
        await asyncio.wait_for(conn.closed, 5)
        assert len(pool) == 1
        await asyncio.wait_for(fresh.closed, 5)  # idle past 0.6 s: closed by the reaper
        assert len(pool) == 0 and fresh.close_reason == "closed"
        pool.abort_all()
        srv.close()

    run(scenario)


def test_a_failed_connect_reaches_every_waiter_and_the_next_acquire_dials_again() -> None:
    async def scenario() -> None:
        pool = H2Pool()
        attempts = []

        async def refused() -> Side:
            attempts.append(1)
            await asyncio.sleep(0.05)
            raise ConnectionRefusedError("nobody there")

        results = await asyncio.gather(
            *(pool.acquire("k", refused) for _ in range(5)), return_exceptions=True
        )
        assert len(attempts) == 1
        assert all(isinstance(r, ConnectionRefusedError) for r in results)
        with pytest.raises(ConnectionRefusedError):
            await pool.acquire("k", refused)
        assert len(attempts) == 2 and len(pool) == 0

    run(scenario)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
