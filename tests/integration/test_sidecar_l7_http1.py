"""The L7 sidecar, HTTP/1.1, through two real sidecars: the app's requests go to the web
sidecar's explicit upstream for `shop/orders:8080` (protocol http), over pooled mTLS
connections to the orders sidecars, and on to real aiohttp backends. Clients are a real
aiohttp client, curl, and raw sockets for what no well-behaved client sends."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from l7_helpers import (
    L7Mesh,
    base_policy,
    log_lines,
    pattern,
    raw_exchange,
    read_until_close,
    split_responses,
    start_l7_mesh,
    stop_l7_mesh,
    wait_for,
)
from sidecar_helpers import metric

from sidecar.accesslog import FIELDS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[L7Mesh]:
    m = start_l7_mesh(tmp_path_factory.mktemp("l7"), web_extra=("--http-header-timeout", "1s"))
    try:
        yield m
    finally:
        stop_l7_mesh(m)


def tag() -> str:
    return uuid.uuid4().hex[:12]


def seen_headers(payload: dict[str, Any]) -> dict[str, str]:
    return dict(payload["headers"])


async def fetch_many(
    url: str,
    count: int,
    *,
    connections: int = 1,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    timeout: float = 60.0,
) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` requests over at most ``connections`` keep-alive connections."""
    results: list[tuple[int, dict[str, str], bytes]] = []
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    budget = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=budget) as session:
        todo = iter(range(count))

        async def worker() -> None:
            for _ in todo:
                async with session.request(method, url, headers=headers) as r:
                    results.append((r.status, dict(r.headers), await r.read()))

        await asyncio.gather(*(worker() for _ in range(connections)))
    return results


# ---- the request path -------------------------------------------------------------------------


async def test_keep_alive_requests_are_balanced_per_request_over_three_replicas(
    mesh: L7Mesh,
) -> None:
    t = tag()
    opened = []

    async def on_create(*_: Any) -> None:
        opened.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        replicas = []
        for _ in range(30):
            async with session.get(mesh.url + "/orders", headers={"x-tag": t}) as r:
                assert r.status == 200
                assert r.headers["x-meshlet-attempts"] == "1"
                replicas.append((await r.json())["replica"])
    assert len(opened) == 1  # one client connection carried all 30
    assert collections.Counter(replicas) == {"orders-0": 10, "orders-1": 10, "orders-2": 10}
    assert mesh.tagged(t) == 30


def test_curl_reuses_its_connection_and_bodies_cross_intact(mesh: L7Mesh, tmp_path: Path) -> None:
    t = tag()
    urls = [f"{mesh.url}/curl/{i}" for i in range(4)]
    out = subprocess.run(
        ["curl", "-sS", "-v", "--http1.1", "--max-time", "10", "-H", f"x-tag: {t}", *urls],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Re-using existing connection") == 3  # one connection, four requests
    replicas = [json.loads("{" + part)["replica"] for part in out.stdout.split("{")[1:] if part]
    assert sorted(set(replicas)) == ["orders-0", "orders-1", "orders-2"]
    # A POST with Content-Length, and a chunked upload that waits for 100 Continue.
    blob = os.urandom(300_000)
    (tmp_path / "blob").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    for extra in (
        [],
        ["-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue"],
    ):
        out = subprocess.run(
            ["curl", "-sS", "--http1.1", "--max-time", "10", "-X", "POST", "--data-binary",
             f"@{tmp_path / 'blob'}", *extra, f"{mesh.url}/upload"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        payload = json.loads(out.stdout)
        assert payload["body_len"] == len(blob) and payload["body_sha256"] == digest
        assert "expect" not in seen_headers(payload)  # answered by the sidecar, not passed on


def test_large_responses_stream_through_intact(mesh: L7Mesh) -> None:
    size = 5 * 1024 * 1024 + 7
    want = hashlib.sha256(pattern(size)).hexdigest()

    async def go() -> list[tuple[str, str | None]]:
        out = []
        async with aiohttp.ClientSession() as s:
            for extra in ({}, {"x-chunked": "1"}):
                headers = {"x-size": str(size), **extra}
                async with s.get(mesh.url + "/big", headers=headers) as r:
                    assert r.status == 200
                    digest = hashlib.sha256(await r.read()).hexdigest()
                    out.append((digest, r.headers.get("transfer-encoding")))
        return out

    (plain, te1), (chunked, te2) = asyncio.run(go())
    assert plain == chunked == want
    assert te1 is None and te2 == "chunked"


def test_pipelined_requests_are_answered_in_order(mesh: L7Mesh) -> None:
    reqs = b"".join(
        b"GET /pipe/%d HTTP/1.1\r\nHost: orders\r\nx-pin: orders-%d\r\n\r\n" % (i, i % 3)
        for i in range(6)
    )
    reqs += b"GET /pipe/last HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"
    data, closed = raw_exchange(mesh.local, reqs, timeout=10)
    assert closed  # Connection: close on the last one
    responses = split_responses(data)
    assert [status for status, _, _ in responses] == [b"HTTP/1.1 200 OK"] * 7
    bodies = [json.loads(body) for _, _, body in responses]
    assert [b["path"] for b in bodies] == [f"/pipe/{i}" for i in range(6)] + ["/pipe/last"]
    assert [b["replica"] for b in bodies[:6]] == [f"orders-{i % 3}" for i in range(6)]
    assert [h.get("connection") for _, h, _ in responses] == [None] * 6 + ["close"]


def test_trace_context_request_id_and_forwarded_for_reach_the_backend(mesh: L7Mesh) -> None:
    async def go() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s:
            out = []
            incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            for headers in (
                {"traceparent": incoming, "tracestate": "vendor=1", "x-request-id": "given-id-1"},
                {},
            ):
                async with s.get(mesh.url + "/trace", headers=headers) as r:
                    assert r.status == 200
                    out.append(await r.json())
            return out

    given, fresh = asyncio.run(go())
    h = seen_headers(given)
    assert h["x-request-id"] == "given-id-1"
    version, trace_id, span, flags = h["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert span != "b7ad6b7169203331"  # a new span id per hop (two hops: both changed it)
    assert h["tracestate"] == "vendor=1"
    assert h["x-forwarded-for"] == "127.0.0.1"
    h = seen_headers(fresh)
    assert uuid.UUID(h["x-request-id"]).version == 4
    assert len(h["traceparent"].split("-")[1]) == 32 and "tracestate" not in h


# ---- retries -----------------------------------------------------------------------------------


def test_a_503_is_retried_on_another_replica(mesh: L7Mesh) -> None:
    t = tag()
    results = asyncio.run(
        fetch_many(mesh.url + "/retry", 30, headers={"x-tag": t, "x-fail-on": "orders-0"})
    )
    assert all(status == 200 for status, _, _ in results)
    served = collections.Counter(json.loads(body)["replica"] for _, _, body in results)
    assert "orders-0" not in served
    attempts = collections.Counter(h["x-meshlet-attempts"] for _, h, _ in results)
    assert set(attempts) == {"1", "2"} and attempts["2"] >= 5
    assert mesh.count("orders-0", t)["tag"] == attempts["2"]  # each of those was tried there once
    text = mesh.web.metrics()
    assert metric(text, "meshlet_retries_total", service="shop/orders", route="all") >= 10


def test_a_failed_post_is_not_retried(mesh: L7Mesh) -> None:
    t = tag()
    results = asyncio.run(
        fetch_many(mesh.url + "/pay", 3, method="POST", headers={"x-tag": t, "x-status": "503"})
    )
    for status, headers, _ in results:
        assert status == 503 and headers["x-meshlet-attempts"] == "1"
    assert mesh.tagged(t) == 3  # each reached one backend once


def test_the_retry_budget_holds_a_failing_service_to_1_2x_plus_the_allowance(
    mesh: L7Mesh,
) -> None:
    t = tag()
    count = 1500
    # The budget is per service: requests of earlier tests still in its 10 s window
    # add their 20% too. Counted from the sidecar's own request counter.
    earlier = sum(
        metric(mesh.web.metrics(), "meshlet_request_total", direction="outbound",
               service="shop/orders", route=route)
        for route in ("all", "split", "slow", "pin-orders-0", "pin-orders-1", "pin-orders-2")
    )  # fmt: skip
    started = time.monotonic()
    results = asyncio.run(
        fetch_many(
            mesh.url + "/down", count, connections=8, headers={"x-tag": t, "x-status": "503"}
        )
    )
    elapsed = time.monotonic() - started
    assert len(results) == count and all(status == 503 for status, _, _ in results)
    seen = mesh.tagged(t)
    # Default budget: 20% of requests + 10 retries/s over a 10 s window (allowance 100).
    allowance = 10 * max(10.0, elapsed) + 0.2 * earlier
    print(f"\n{count} requests to a failing service: {seen} reached it in {elapsed:.1f}s")
    assert count < seen <= 1.2 * count + allowance, (seen, elapsed, earlier)
    assert seen > 1.2 * count  # retries did happen, up to the budget (3 attempts: 4500)
    text = mesh.web.metrics()
    assert metric(text, "meshlet_retries_skipped_total", service="shop/orders",
                  reason="budget-exhausted") > 0  # fmt: skip


# ---- routing ---------------------------------------------------------------------------------


def test_a_90_10_split_holds_within_two_points_over_10000_requests(mesh: L7Mesh) -> None:
    count = 10_000
    started = time.monotonic()
    results = asyncio.run(fetch_many(mesh.url + "/split", count, connections=16, timeout=300))
    elapsed = time.monotonic() - started
    assert len(results) == count and all(status == 200 for status, _, _ in results)
    served = collections.Counter(h["x-replica"] for _, h, _ in results)
    v2 = served["orders-2"] / count
    print(f"\n10000 requests through two sidecars in {elapsed:.1f}s ({count / elapsed:.0f}/s)")
    assert abs(v2 - 0.10) <= 0.02, served
    assert served["orders-0"] and served["orders-1"]


# ---- timeouts and the breaker -------------------------------------------------------------------


def test_a_request_timeout_answers_504_and_the_backend_request_is_abandoned(
    mesh: L7Mesh,
) -> None:
    t = tag()
    started = time.monotonic()
    out = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "10", "-H", f"x-tag: {t}", "-H", "x-delay: 5",
         f"{mesh.url}/slow"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    took = time.monotonic() - started
    assert out.stdout.startswith("HTTP/1.1 504"), out.stdout
    assert 0.9 <= took < 2.0  # the route's 1 s timeout, plus slack
    assert "x-meshlet-attempts: 1" in out.stdout
    wait_for(lambda: mesh.count("orders-1", t)["cancelled"] == 1, "the backend's handler cancelled")
    text = mesh.web.metrics()
    assert metric(text, "meshlet_request_timeouts_total", direction="outbound",
                  service="shop/orders", route="slow") >= 1  # fmt: skip


def test_per_try_timeouts_move_on_to_a_new_endpoint_each_time(mesh: L7Mesh) -> None:
    policy = base_policy()
    policy["retries"] = {"per_try_timeout_s": 0.3}
    mesh.set_policy(policy)
    try:
        t = tag()
        started = time.monotonic()
        out = subprocess.run(
            ["curl", "-sS", "-i", "--max-time", "10", "-H", f"x-tag: {t}", "-H", "x-delay: 3",
             f"{mesh.url}/per-try"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        took = time.monotonic() - started
        assert out.stdout.startswith("HTTP/1.1 504"), out.stdout
        assert "x-meshlet-attempts: 3" in out.stdout and took < 2.0
        # Three tries, one per replica, each abandoned when its time was up.
        assert [mesh.count(name, t)["tag"] for name in mesh.app_ports] == [1, 1, 1]
        wait_for(
            lambda: sum(mesh.count(name, t)["cancelled"] for name in mesh.app_ports) == 3,
            "every replica's handler cancelled",
        )
    finally:
        mesh.set_policy(base_policy())


def test_an_overflowing_breaker_answers_503_at_once_with_the_reason(mesh: L7Mesh) -> None:
    policy = base_policy()
    policy["circuit_breaker"] = {"max_requests": 1}
    mesh.set_policy(policy)
    try:

        async def go() -> tuple[int, dict[str, str], float]:
            async with aiohttp.ClientSession() as s:
                slow = asyncio.ensure_future(s.get(mesh.url + "/hold", headers={"x-delay": "1.5"}))
                await asyncio.sleep(0.5)
                started = time.monotonic()
                async with s.get(mesh.url + "/other") as r:
                    result = (r.status, dict(r.headers), time.monotonic() - started)
                (await slow).close()
                return result

        status, headers, took = asyncio.run(go())
        assert status == 503 and headers["x-meshlet-overflow"] == "requests"
        assert took < 0.5
        text = mesh.web.metrics()
        assert metric(text, "meshlet_breaker_overflow_total", service="shop/orders",
                      kind="requests") >= 1  # fmt: skip
    finally:
        mesh.set_policy(base_policy())


# ---- observability -------------------------------------------------------------------------------


def test_one_access_log_line_per_request_with_envoys_fields(mesh: L7Mesh) -> None:
    request_id = f"log-{tag()}"
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"x-request-id: {request_id}",
         "-A", "meshlet-test", f"{mesh.url}/logged?q=1"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.stdout == "200"

    def line(proc: Any) -> dict[str, Any]:
        found = [e for e in log_lines(proc) if e["request_id"] == request_id]
        assert len(found) == 1
        return found[0]

    wait_for(lambda: line(mesh.web), "the web sidecar's access log line")
    entry = line(mesh.web)
    assert tuple(entry) == FIELDS
    assert entry["method"] == "GET" and entry["path"] == "/logged?q=1"
    assert entry["protocol"] == "HTTP/1.1" and entry["response_code"] == 200
    assert entry["response_flags"] == "-" and entry["user_agent"] == "meshlet-test"
    assert entry["direction"] == "outbound" and entry["attempts"] == 1
    assert entry["destination_identity"] == "spiffe://l7.test/ns/shop/sa/orders"
    assert entry["route"] == "all" and entry["service"] == "shop/orders"
    assert entry["bytes_sent"] > 0 and isinstance(entry["duration"], int)
    host = entry["upstream_host"]
    replica = next(sc for sc in mesh.orders.values() if host == f"{sc.address}:{sc.inbound_port}")
    wait_for(lambda: line(replica), "the orders sidecar's access log line")
    inbound = line(replica)
    assert inbound["direction"] == "inbound"
    assert inbound["source_identity"] == "spiffe://l7.test/ns/shop/sa/web"
    assert inbound["trace_id"] == entry["trace_id"]
    text = mesh.web.metrics()
    assert metric(text, "meshlet_request_total", direction="outbound", service="shop/orders",
                  route="all") >= 1  # fmt: skip
    assert metric(text, "meshlet_response_total", direction="outbound", service="shop/orders",
                  route="all", status_code="200", classification="success") >= 1  # fmt: skip
    assert metric(text, "meshlet_response_latency_seconds_count", direction="outbound",
                  service="shop/orders", route="all") >= 1  # fmt: skip
    text = replica.metrics()
    assert metric(text, "meshlet_response_total", direction="inbound", service="shop/orders",
                  route="-", status_code="200", classification="success") >= 1  # fmt: skip


# ---- limits and bad input ------------------------------------------------------------------------

SMUGGLING = {
    "cl_te": b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two_cl": b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nAA",
    "bad_chunk": b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0x5\r\nhello\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: o\r\nX-A: 1\r\n  folded\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: o\r\n\r\n",
    "nul": b"GET / HTTP/1.1\r\nHost: o\r\nX-A: a\x00b\r\n\r\n",
    "te_space": b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te_cl_prefix": b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: xchunked\r\n\r\n",
}


def _limits(header_count: int, header_size: int) -> bytes:
    """A request with Host, ``header_count`` more fields and one of ``header_size``
    bytes; it asks to close the connection after the answer."""
    fields = b"".join(b"x-h%d: v\r\n" % i for i in range(header_count))
    big = b"x-big: " + b"a" * header_size + b"\r\n" if header_size else b""
    return b"GET /limits HTTP/1.1\r\nHost: o\r\nConnection: close\r\n" + fields + big + b"\r\n"


def test_header_limits_and_smuggling_vectors_never_reach_a_backend(mesh: L7Mesh) -> None:
    before = mesh.total()
    ok, _ = raw_exchange(mesh.local, _limits(98, 0))  # 100 fields: Envoy's limit, fine
    assert ok.startswith(b"HTTP/1.1 200")
    for payload in (_limits(99, 0), _limits(0, 61 * 1024)):  # 101 fields; 61 KiB
        answer, closed = raw_exchange(mesh.local, payload)
        assert answer.startswith(b"HTTP/1.1 431") and closed
    for name, payload in SMUGGLING.items():
        answer, closed = raw_exchange(mesh.local, payload)
        assert answer.split(b" ")[1] in (b"400", b"501"), (name, answer[:200])
        assert closed, name
    assert mesh.total() == before + 1  # only the well-formed request arrived


def test_the_inbound_side_refuses_the_same_vectors(mesh: L7Mesh) -> None:
    """A caller with a valid mesh certificate that speaks HTTP/1.1 itself (no sidecar
    in front of it) gets the same answers: nothing malformed reaches the app."""
    target = mesh.orders["orders-0"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_cert_chain(mesh.web.cert_dir / "cert.pem", mesh.web.cert_dir / "key.pem")
    ctx.load_verify_locations(mesh.cp.data_dir / "ca" / "bundle.pem")
    ctx.set_alpn_protocols(["http/1.1"])

    def exchange(payload: bytes) -> tuple[bytes, bool]:
        address = (target.address, target.inbound_port)
        with socket.create_connection(address, timeout=5) as raw, ctx.wrap_socket(raw) as s:
            assert s.selected_alpn_protocol() == "http/1.1"
            s.sendall(payload)
            try:
                return read_until_close(s, 5.0)
            except ssl.SSLError:
                return b"", True

    before = mesh.count("orders-0")["total"]
    ok, _ = exchange(b"GET /direct HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200") and b"orders-0" in ok
    # The limits leave room for the four fields a calling sidecar adds, and no more.
    for payload in (_limits(103, 0), _limits(0, 63 * 1024)):
        answer, closed = exchange(payload)
        assert answer.startswith(b"HTTP/1.1 431") and closed
    for name, payload in SMUGGLING.items():
        answer, closed = exchange(payload)
        assert answer.split(b" ")[1] in (b"400", b"501"), (name, answer[:200])
    assert mesh.count("orders-0")["total"] == before + 1


def test_a_slow_request_head_is_cut_off_by_the_header_timeout(mesh: L7Mesh) -> None:
    with socket.create_connection(("127.0.0.1", mesh.local), timeout=5) as s:
        s.sendall(b"GET /slowloris HTTP/1.1\r\nHost: o\r\n")
        started = time.monotonic()
        data, closed = read_until_close(s, 4.0)
    assert closed and data == b"" and 0.8 <= time.monotonic() - started < 3.0


# ---- pooled connections --------------------------------------------------------------------------


def test_a_pooled_connection_closed_by_the_app_is_replaced_without_an_error(
    mesh: L7Mesh,
) -> None:
    """The race the pool cannot see coming: the app closes a kept-alive connection just
    as the next request arrives. The inbound sidecar sends the GET again, once, on a
    new connection."""
    t = tag()
    pin = {"x-pin": "orders-2"}

    async def go() -> list[tuple[int, dict[str, str], bytes]]:
        out = []
        async with aiohttp.ClientSession() as s:
            for headers in (pin, {**pin, "x-close-once": t, "x-tag": t}):
                async with s.get(mesh.url + "/race", headers=headers) as r:
                    out.append((r.status, dict(r.headers), await r.read()))
        return out

    before = metric(mesh.orders["orders-2"].metrics(), "meshlet_http_pool_stale_total",
                    direction="inbound", service="shop/orders")  # fmt: skip
    results = asyncio.run(go())
    assert [status for status, _, _ in results] == [200, 200]
    assert results[1][1]["x-meshlet-attempts"] == "1"
    assert mesh.count("orders-2", t)["tag"] == 2  # the closed one, then the new one
    after = metric(mesh.orders["orders-2"].metrics(), "meshlet_http_pool_stale_total",
                   direction="inbound", service="shop/orders")  # fmt: skip
    assert after == before + 1


def test_a_dead_then_restarted_peer_sidecar_costs_no_failed_get(mesh: L7Mesh) -> None:
    pin = {"x-pin": "orders-2"}

    async def get() -> int:
        async with aiohttp.ClientSession() as s, s.get(mesh.url + "/again", headers=pin) as r:
            await r.read()
            return r.status

    assert asyncio.run(get()) == 200  # a pooled connection to orders-2 now exists
    mesh.orders["orders-2"].kill()
    # While it is down (and still in the map): its connects fail and are retried elsewhere.
    results = asyncio.run(fetch_many(mesh.url + "/down-peer", 12))
    assert [status for status, _, _ in results] == [200] * 12
    served = collections.Counter(json.loads(body)["replica"] for _, _, body in results)
    assert "orders-2" not in served
    assert any(h["x-meshlet-attempts"] == "2" for _, h, _ in results)
    mesh.restart_order("orders-2", signal.SIGKILL)
    wait_for(
        lambda: any(
            e["id"] == "orders-2" and e["health"] == "healthy"
            for e in mesh.web.json("/clusters")["clusters"][0]["endpoints"]
        ),
        "orders-2 back in the web sidecar's map",
    )
    assert [asyncio.run(get()) for _ in range(3)] == [200, 200, 200]
    text = mesh.web.metrics()
    assert metric(text, "meshlet_tcp_connect_errors_total", service="shop/orders",
                  reason="refused") >= 1  # fmt: skip


# ---- protocol corners ------------------------------------------------------------------------------


def test_head_204_304_and_a_websocket_upgrade_cross_the_mesh(mesh: L7Mesh) -> None:
    for args, status in (
        (["-I"], "200"),
        (["-H", "x-status: 204"], "204"),
        (["-H", "x-status: 304"], "304"),
    ):
        out = subprocess.run(
            ["curl", "-sS", "-i", "--max-time", "5", *args, f"{mesh.url}/corner", f"{mesh.url}/corner"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr  # no body hangs the keep-alive connection
        assert out.stdout.count(f"HTTP/1.1 {status}") == 2, out.stdout

    async def ws() -> list[str]:
        async with aiohttp.ClientSession() as s, s.ws_connect(mesh.url + "/ws") as w:
            got = []
            for word in ("hi", "again"):
                await w.send_str(word)
                got.append((await w.receive(timeout=5)).data)
            return got

    first, second = asyncio.run(ws())
    assert first.endswith(":hi") and second == first.split(":")[0] + ":again"


def test_sigterm_on_a_peer_lets_its_in_flight_request_finish(mesh: L7Mesh) -> None:
    """Draining: the orders sidecar stops accepting, answers what it has (with
    connection: close) and exits; the web sidecar's pool drops its connections."""
    t = tag()
    victim = mesh.orders["orders-0"]

    async def slow() -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as s:
            headers = {"x-pin": "orders-0", "x-delay": "1", "x-tag": t}
            async with s.get(mesh.url + "/drain", headers=headers) as r:
                return r.status, await r.read()

    async def go() -> tuple[int, bytes]:
        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0.4)
        victim.signal(signal.SIGTERM)
        return await task

    status, body = asyncio.run(go())
    assert status == 200 and json.loads(body)["replica"] == "orders-0"
    assert victim.wait(timeout=20) == 0
    mesh.restart_order("orders-0", signal.SIGTERM)
    wait_for(
        lambda: any(
            e["id"] == "orders-0" and e["health"] == "healthy"
            for e in mesh.web.json("/clusters")["clusters"][0]["endpoints"]
        ),
        "orders-0 back in the web sidecar's map",
    )
    results = asyncio.run(fetch_many(mesh.url + "/after", 6, headers={"x-pin": "orders-0"}))
    assert [status for status, _, _ in results] == [200] * 6
