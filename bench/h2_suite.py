"""HTTP/2 through ``sidecar.h2conn``: h2load against (a) an h2c server built on
H2Connection ("direct"), (b) the same behind a forwarding proxy made of two
H2Connections per hop, streams spliced frame by frame ("proxy"), and (c) the sidecar
shape: app → outbound proxy (h2c in, h2 over mTLS out) → inbound proxy (h2 over mTLS in,
h2c out) → server ("mtls_chain"). Requests/s, latency p50/p99 (from h2load's per-request
log) and the proxy process's CPU per request.

Three kinds of process on 127.0.0.1, each on uvloop: the server, the proxy (both hops
of the chain) and h2load. Run alone with ``python -m bench.h2_suite [--quick]``; it fits
``bench/__main__.py``'s SUITES as ``"h2": "bench.h2_suite"``. Needs h2load (Debian
package nghttp2-client); without it the suite returns no rows.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.relay_suite import _cpu_s, _write_certs
from bench.stats import percentile

MODES = ("direct", "proxy", "mtls_chain")


# ---- the server (own process) -------------------------------------------------------------


def _server_main(conn: Connection) -> None:
    import uvloop

    from sidecar.h2conn import H2Connection, H2Stream, StreamHandler
    from sidecar.relay import PlainSide

    class Echo(StreamHandler):
        def on_data(self, stream: H2Stream, data: bytes) -> None:
            stream.send_data(data)

        def on_end(self, stream: H2Stream) -> None:
            stream.end()

    def on_stream(stream: H2Stream) -> None:
        if stream.remote_ended:  # a GET: a small answer
            stream.send_headers([(b":status", b"200"), (b"content-length", b"2")])
            stream.send_data(b"ok", end_stream=True)
            stream.set_handler(StreamHandler())
        else:  # a body: echoed as it comes
            stream.send_headers([(b":status", b"200")])
            stream.on_sent = stream.consumed
            stream.set_handler(Echo())

    class Side(PlainSide):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            H2Connection(self, client=False, on_stream=on_stream).start()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Side, "127.0.0.1", 0, backlog=1024)
        conn.send(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, conn.recv)

    uvloop.run(main())


# ---- the proxy (own process): a spliced hop, or the two hops of the mTLS chain --------------


def _proxy_main(mode: str, certdir: str, backend: int, conn: Connection) -> None:
    import ssl

    import uvloop

    from sidecar import tls
    from sidecar.h2conn import H2Connection, H2Stream, splice
    from sidecar.relay import PlainSide
    from sidecar.tlsleg import TlsLeg

    d = Path(certdir)
    bundle = (d / "bundle.pem").read_bytes()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        async def dial(port: int, ctx: ssl.SSLContext | None) -> H2Connection:
            side: Any
            if ctx is None:
                _, side = await loop.create_connection(PlainSide, "127.0.0.1", port)
            else:
                _, side = await loop.create_connection(
                    lambda: TlsLeg(ctx, server_side=False), "127.0.0.1", port
                )
                await side.handshake
            upstream = H2Connection(side, client=True)
            upstream.start()
            return upstream

        async def hop(port: int, inbound: ssl.SSLContext | None, out: ssl.SSLContext | None) -> int:
            """A listener whose every connection gets its own upstream connection."""

            async def accept(side: Any) -> None:
                if isinstance(side, TlsLeg):
                    await side.handshake
                upstream = await dial(port, out)

                def on_stream(down: H2Stream) -> None:
                    if not upstream.can_open_stream():
                        down.reset(7)  # REFUSED_STREAM
                        return
                    assert down.headers is not None
                    splice(down, upstream.open_stream(down.headers, end_stream=down.remote_ended))

                H2Connection(side, client=False, on_stream=on_stream).start()

            def factory() -> Any:
                side = TlsLeg(inbound, server_side=True) if inbound else PlainSide()
                task = loop.create_task(accept(side))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                return side

            server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
            return int(server.sockets[0].getsockname()[1])

        if mode == "proxy":
            front = await hop(backend, None, None)
        else:
            server_ctx = tls.server_context(
                d / "orders.pem", d / "orders.key", bundle, alpn=("h2",)
            )
            client_ctx = tls.client_context(d / "web.pem", d / "web.key", bundle, alpn=("h2",))
            inbound = await hop(backend, server_ctx, None)
            front = await hop(inbound, None, client_ctx)
        conn.send(front)
        await loop.run_in_executor(None, conn.recv)

    uvloop.run(main())


# ---- h2load (the client) --------------------------------------------------------------------


def _h2load(
    port: int, n: int, clients: int, streams: int, log: Path, body: Path | None
) -> dict[str, Any]:
    argv = ["h2load", "-n", str(n), "-c", str(clients), "-m", str(streams), "-t", "1"]
    argv += ["--log-file", str(log)]
    log.unlink(missing_ok=True)  # h2load appends
    if body is not None:
        argv += ["-d", str(body)]
    out = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=300
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("finished in"))
    rps = float(line.split(",")[1].split()[0])
    done = next(x for x in out.splitlines() if x.startswith("requests:"))
    succeeded = int(done.split("done,")[1].split()[0])
    samples = []
    for row in log.read_text().splitlines():
        _, status, micros = row.split("\t")[:3]
        if status.startswith("2"):
            samples.append(float(micros))
    return {
        "requests_per_s": rps,
        "p50_us": percentile(samples, 50),
        "p99_us": percentile(samples, 99),
        "succeeded": succeeded,
        "requests": n,
    }


def run(quick: bool) -> list[dict[str, Any]]:
    if shutil.which("h2load") is None:
        print("   h2load not found (apt-get install nghttp2-client): skipped", file=sys.stderr)
        return []
    n = 5_000 if quick else 30_000
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="h2-bench-") as tmp:
        t = Path(tmp)
        _write_certs(t)
        (t / "body.bin").write_bytes(b"p" * 16 * 1024)
        parent, child = ctx.Pipe()
        server = ctx.Process(target=_server_main, args=(child,), daemon=True)
        server.start()
        backend = parent.recv()
        try:
            for mode in MODES:
                rows += _mode_rows(ctx, mode, tmp, backend, n)
        finally:
            parent.send("stop")
            server.join(5)
    return rows


def _mode_rows(ctx: Any, mode: str, tmp: str, backend: int, n: int) -> list[dict[str, Any]]:
    proxy = None
    port = backend
    if mode != "direct":
        parent, child = ctx.Pipe()
        proxy = ctx.Process(target=_proxy_main, args=(mode, tmp, backend, child), daemon=True)
        proxy.start()
        port = parent.recv()

    def cpu() -> float:
        return _cpu_s(proxy.pid) if proxy is not None else 0.0

    rows = []
    log = Path(tmp) / "h2load.log"
    cases = [
        ("get_c4_m10", 4, 10, None, n),
        ("get_c1_m1", 1, 1, None, n // 5),
        ("post_16KiB_c4_m10", 4, 10, Path(tmp) / "body.bin", n // 5),
    ]
    try:
        _h2load(port, 500, 4, 10, log, None)  # warm-up
        for name, clients, streams, body, count in cases:
            c0 = cpu()
            figures = _h2load(port, count, clients, streams, log, body)
            used = cpu() - c0
            row = {"suite": "h2", "name": f"{name}_{mode}", **figures}
            if proxy is not None:
                row["proxy_cpu_us_per_req"] = used / count * 1e6
            rows.append(row)
    finally:
        if proxy is not None:
            parent.send("stop")
            proxy.join(5)
            if proxy.is_alive():
                proxy.kill()
    return rows


if __name__ == "__main__":
    for r in run("--quick" in sys.argv):
        extra = (
            f"  proxy {r['proxy_cpu_us_per_req']:6.0f} us/req"
            if "proxy_cpu_us_per_req" in r
            else ""
        )
        print(
            f"{r['name']:<30} {r['requests_per_s']:>9.0f} req/s  p50 {r['p50_us']:8.0f} us"
            f"  p99 {r['p99_us']:8.0f} us  ok {r['succeeded']}/{r['requests']}{extra}"
        )
