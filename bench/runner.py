"""The comparison run (`make bench`): every workload against direct, meshlet and HAProxy,
interleaved A B C A B C, at least three runs each; proxy CPU from /proc for both hops;
memory with idle proxied connections; the control plane's figures; a py-spy profile of
meshlet on the workload where it is furthest behind HAProxy.

For: measuring and returning the results document (``bench.report`` renders it).
Must never: assert on a figure (figures are reported, not judged, here), or leave a
process running (the topology is stopped by PID in every path out).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import procs
from bench.clients import ClientWorker, MiB
from bench.stats import interleave, median, medians, parse_wrk, ratio, vcpu_per_krps_per_hop
from bench.topology import Topology
from bench.workloads import HOPS, VARIANTS, WORKLOADS, Sizes, Workload

DOCS = procs.REPO / "docs" / "benchmarks"
Say = Callable[[str], None]


def _say(text: str) -> None:
    print(text, flush=True)


def _wrk(tools: dict[str, str], port: int, connections: int, seconds: float) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    args = [
        tools["wrk"],
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "--latency",
        f"http://127.0.0.1:{port}/",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise procs.BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def run_once(
    topo: Topology, worker: ClientWorker, wl: Workload, variant: str, sizes: Sizes
) -> dict[str, float]:
    """One run of one workload against one variant, with the proxies' CPU."""
    port = topo.port(variant, wl.path)
    proxies = topo.proxies(variant, wl.path)
    cpu0 = [procs.cpu_s(p.pid) for p in proxies]
    t0 = time.perf_counter()
    if wl.kind == "bulk":
        fig = worker.call("bulk", port=port, nbytes=sizes.bulk_mib * MiB)
    elif wl.kind == "pingpong":
        fig = worker.call("pingpong", port=port, rounds=sizes.pingpong_rounds)
    elif wl.kind == "churn":
        fig = worker.call("churn", port=port, seconds=sizes.seconds, concurrency=wl.connections)
    elif wl.kind == "grpc":
        fig = worker.call("grpc", port=port, seconds=sizes.seconds, concurrency=wl.connections)
    elif wl.kind == "wrk":
        fig = _wrk(topo.tools, port, wl.connections, sizes.seconds)
    else:
        raise ValueError(wl.kind)
    wall = time.perf_counter() - t0
    topo.check_alive()
    if proxies:
        cpu = sum(procs.cpu_s(p.pid) - c for p, c in zip(proxies, cpu0, strict=True))
        fig["proxy_cpu_s"] = cpu
        fig["proxy_vcpu"] = cpu / wall
        if wl.kind == "bulk":
            fig["proxy_cpu_s_per_gb"] = cpu / (2 * sizes.bulk_mib * MiB / 1e9)
        else:
            fig["vcpu_per_krps_per_hop"] = vcpu_per_krps_per_hop(
                cpu, wall, fig.get("requests", 0.0), HOPS
            )
    fig["wall_s"] = wall
    return fig


def _brief(wl: Workload, fig: dict[str, float]) -> str:
    parts = [f"{fig.get(wl.primary, float('nan')):,.0f} {wl.unit}"]
    parts += [f"{k} {fig[k]:.3g}" for k in wl.latency if k in fig]
    if "vcpu_per_krps_per_hop" in fig:
        parts.append(f"{fig['vcpu_per_krps_per_hop']:.3f} vCPU/krps/hop")
    if "proxy_cpu_s_per_gb" in fig:
        parts.append(f"{fig['proxy_cpu_s_per_gb']:.2f} CPU s/GB")
    for bad in ("errors", "socket_errors", "non_2xx"):
        if fig.get(bad):
            parts.append(f"{bad} {fig[bad]:.0f}")
    return ", ".join(parts)


def interleaved_runs(
    wl: Workload,
    variants: Sequence[str],
    sizes: Sizes,
    once: Callable[[str, Sizes], dict[str, float]],
    say: Say,
) -> dict[str, Any]:
    """One workload over ``variants``: a warm-up of each (bulk and ping-pong only, not
    recorded), then ``sizes.runs`` interleaved runs (A B C A B C …) and their medians.
    ``once(variant, sizes)`` runs one and returns its figures; the loopback harness and
    ``--lab`` differ only there."""
    warm = dataclasses.replace(sizes, bulk_mib=16, pingpong_rounds=200, seconds=1.0)
    for variant in variants:  # warm-up, not recorded: caches, pools, JITs of the allocator
        if wl.kind in ("bulk", "pingpong"):
            once(variant, warm)
    width = max(len(v) for v in variants)
    runs: list[dict[str, Any]] = []
    for i, variant in interleave(variants, sizes.runs):
        fig = once(variant, sizes)
        runs.append({"variant": variant, "run": i, **fig})
        say(f"   {wl.id:<12} {variant:<{width}} run {i + 1}/{sizes.runs}  {_brief(wl, fig)}")
    return {
        "id": wl.id,
        "title": wl.title,
        "path": wl.path,
        "kind": wl.kind,
        "primary": wl.primary,
        "unit": wl.unit,
        "higher_is_better": wl.higher_is_better,
        "latency": list(wl.latency),
        "latency_unit": wl.latency_unit,
        "connections": wl.connections,
        "runs": runs,
        "medians": {v: medians([r for r in runs if r["variant"] == v]) for v in variants},
    }


def run_workload(
    topo: Topology, worker: ClientWorker, wl: Workload, sizes: Sizes, say: Say
) -> dict[str, Any]:
    return interleaved_runs(
        wl, VARIANTS, sizes, lambda variant, sz: run_once(topo, worker, wl, variant, sz), say
    )


MEMORY_VARIANTS = ("meshlet", "haproxy")
HOP_NAMES = ("outbound", "inbound")


def measure_memory(
    topo: Topology,
    worker: ClientWorker,
    counts: Sequence[int],
    settle_s: float,
    say: Say,
    runs: int = 3,
) -> dict[str, Any]:
    """RSS of both hops idle, then holding ``counts`` idle proxied connections (echo
    path; each proven end to end by one echoed byte). ``runs`` rounds, interleaved
    (meshlet haproxy meshlet …), each on freshly started hops; per figure, the median."""
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in MEMORY_VARIANTS}
    for i, variant in interleave(MEMORY_VARIANTS, runs):
        if i > 0:  # the first round runs on the processes the topology just started
            topo.restart(variant, "echo")
        rounds[variant].append(_memory_round(topo, worker, variant, counts, settle_s, i, runs, say))
        topo.check_alive()
    return {
        "counts": list(counts),
        "runs": runs,
        "variants": {v: combine_memory_rounds(rounds[v]) for v in MEMORY_VARIANTS},
    }


def _memory_round(
    topo: Topology,
    worker: ClientWorker,
    variant: str,
    counts: Sequence[int],
    settle_s: float,
    i: int,
    runs: int,
    say: Say,
) -> dict[str, Any]:
    hops = topo.proxies(variant, "echo")
    time.sleep(settle_s)
    idle = {n: procs.rss_kib(p.pid) for n, p in zip(HOP_NAMES, hops, strict=True)}
    row: dict[str, Any] = {"idle_kib": idle, "loaded": []}
    held = 0
    try:
        for n in counts:
            t0 = time.perf_counter()
            worker.call("hold", timeout=600, port=topo.port(variant, "echo"), count=n - held)
            opened = time.perf_counter() - t0
            held = n
            time.sleep(settle_s)
            rss = {k: procs.rss_kib(p.pid) for k, p in zip(HOP_NAMES, hops, strict=True)}
            per = {k: (rss[k] - idle[k]) / n for k in HOP_NAMES}
            row["loaded"].append(
                {"connections": n, "rss_kib": rss, "kib_per_conn": per, "open_s": opened}
            )
    finally:
        worker.call("release", timeout=300)
    say(
        f"   memory       {variant:<8} run {i + 1}/{runs}  idle "
        + ", ".join(f"{k} {idle[k] / 1024:.1f} MiB" for k in HOP_NAMES)
        + "".join(
            f"; {r['connections']} conns "
            + ", ".join(f"{k} {r['kib_per_conn'][k]:.1f} KiB/conn" for k in HOP_NAMES)
            for r in row["loaded"]
        )
    )
    time.sleep(settle_s)
    return row


def combine_memory_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one variant as one row of medians (per hop, per connection count:
    idle RSS, RSS, KiB per connection, time to open), with every round kept."""
    hops = list(rounds[0]["idle_kib"]) if rounds else []
    out: dict[str, Any] = {
        "idle_kib": {h: median(r["idle_kib"][h] for r in rounds) for h in hops},
        "loaded": [],
        "rounds": list(rounds),
    }
    for j in range(min((len(r["loaded"]) for r in rounds), default=0)):
        at = [r["loaded"][j] for r in rounds]
        out["loaded"].append(
            {
                "connections": at[0]["connections"],
                "rss_kib": {h: median(a["rss_kib"][h] for a in at) for h in hops},
                "kib_per_conn": {h: median(a["kib_per_conn"][h] for a in at) for h in hops},
                "open_s": median(a["open_s"] for a in at),
            }
        )
    return out


def _grpc_mode(topo: Topology) -> str:
    """Whether meshlet carried gRPC per request (L7) or relayed it at L4: the outbound
    sidecar counts L7 requests per service."""
    text = procs.http_get(f"http://127.0.0.1:{topo.client_admin}/stats/prometheus").decode()
    for line in text.splitlines():
        if (
            line.startswith("meshlet_request_total{")
            and 'service="bench/grpc"' in line
            and float(line.rsplit(" ", 1)[1]) > 0
        ):
            return "L7 (HTTP/2 per request)"
    return "L4 relay (the sidecar does not carry gRPC per request yet)"


def slowest(workloads: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The workload where meshlet is furthest behind HAProxy on its headline figure."""
    worst, worst_ratio = None, float("inf")
    for w in workloads:
        m = w["medians"]["meshlet"].get(w["primary"])
        h = w["medians"]["haproxy"].get(w["primary"])
        r = ratio(m, h) if w["higher_is_better"] else ratio(h, m)
        if r == r and r < worst_ratio:
            worst, worst_ratio = w, r
    return worst


def profile(
    topo: Topology, worker: ClientWorker, wl: Workload, sizes: Sizes, say: Say
) -> dict[str, Any]:
    """py-spy on both meshlet hops while the workload runs again; flamegraph SVGs in
    docs/benchmarks/ (linked from the report)."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return {"workload": wl.id, "error": "py-spy is not installed (pip install py-spy)"}
    DOCS.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    spies: list[subprocess.Popen[bytes]] = []
    for hop, proc in zip(("outbound", "inbound"), topo.proxies("meshlet", wl.path), strict=True):
        out = DOCS / f"profile-{wl.id}-{hop}.svg"
        files[hop] = str(out.relative_to(procs.REPO))
        out.unlink(missing_ok=True)  # a profile from an earlier run must not pass for this one
        spies.append(
            subprocess.Popen(
                [
                    str(spy),
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--duration",
                    str(max(1, round(sizes.profile_s))),
                    "--rate",
                    "250",
                    "--nonblocking",
                    "--format",
                    "flamegraph",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    time.sleep(0.5)
    deadline = time.monotonic() + sizes.profile_s + 60
    short = dataclasses.replace(sizes, seconds=1.0, bulk_mib=min(sizes.bulk_mib, 256))
    while any(s.poll() is None for s in spies) and time.monotonic() < deadline:
        run_once(topo, worker, wl, "meshlet", short)
    errors = []
    for s in spies:
        try:
            _, err = s.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            s.kill()
            _, err = s.communicate()
        if s.returncode != 0:
            errors.append(err.decode(errors="replace").strip()[-500:])
    files = {hop: f for hop, f in files.items() if (procs.REPO / f).exists()}
    if not files:
        say(f"   profile      py-spy wrote nothing: {'; '.join(errors)}")
        return {"workload": wl.id, "error": "py-spy wrote nothing: " + "; ".join(errors)}
    say(f"   profile      meshlet on {wl.id}: {', '.join(files.values())}")
    return {"workload": wl.id, "files": files, "seconds": sizes.profile_s, "errors": errors}


def control_plane(sizes: Sizes, quick: bool, say: Say) -> list[dict[str, Any]]:
    """Reuses bench.control_plane_suite: registration fan-out, snapshot, RSS."""
    import uvloop

    from bench import control_plane_suite as cps

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    rows = [cps.snapshot_figures(quick)]
    with (
        tempfile.TemporaryDirectory(prefix="meshlet-bench-cp-") as tmp,
        cps.ControlPlaneProcess(Path(tmp) / "cp") as cp,
    ):
        rows.append(
            asyncio.run(cps._fanout(cp, watchers=sizes.watchers, registrations=sizes.registrations))
        )
        rows.append(asyncio.run(cps._fill(cp, sizes.cp_endpoints)))
    for row in rows:
        figures = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in row.items()
            if k not in ("suite", "name")
        )
        say(f"   control-plane {row['name']}: {figures}")
    return rows


def run(
    sizes: Sizes,
    *,
    quick: bool,
    only: Sequence[str] = (),
    with_profile: bool = True,
    with_memory: bool = True,
    with_control_plane: bool = True,
    say: Say = _say,
) -> dict[str, Any]:
    tools = procs.ensure_tools()
    nofile = procs.raise_nofile()
    info = procs.machine_info(tools)
    selected = [w for w in WORKLOADS if not only or w.id in only]
    notes: list[str] = []
    if quick:
        notes.append(
            f"--quick: bulk {sizes.bulk_mib} MiB each way (not 1 GiB), {sizes.seconds:g} s "
            f"per wrk/gRPC/churn run, {sizes.pingpong_rounds} ping-pong rounds, idle "
            f"connections {'/'.join(map(str, sizes.idle_conns))} (not 1,000/5,000), "
            f"{sizes.watchers} watchers (not 1,000), {sizes.cp_endpoints} endpoints (not 10,000)"
        )
    phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            phases[name] = time.perf_counter() - t0

    results: dict[str, Any] = {
        "phases_s": phases,
        "quick": quick,
        "lab": False,
        "machine": info,
        "sizes": dataclasses.asdict(sizes),
        "variants": list(VARIANTS),
        "hops": HOPS,
        "rlimit_nofile": nofile,
        "notes": notes,
        "workloads": [],
    }
    say(
        f"== comparison: {', '.join(VARIANTS)}; {sizes.runs} runs each, interleaved; "
        f"load average {info['loadavg_start'][0]:.2f} on {info['cores']} cores"
    )
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-") as tmp_s:
        topo = Topology(Path(tmp_s), tools)
        worker: ClientWorker | None = None
        try:
            with phase("start"):
                topo.start()
                worker = ClientWorker()
            say(f"   started apps, 6 sidecars, 2 HAProxy hops in {phases['start']:.1f} s")
            if with_memory:
                with phase("memory"):
                    results["memory"] = measure_memory(
                        topo, worker, sizes.idle_conns, sizes.settle_s, say, runs=sizes.runs
                    )
            for wl in selected:
                with phase(wl.id):
                    results["workloads"].append(run_workload(topo, worker, wl, sizes, say))
                if wl.kind == "grpc" and "grpc_mode" not in results:
                    results["grpc_mode"] = _grpc_mode(topo)
            worst = slowest(results["workloads"])
            if with_profile and worst is not None:
                wl = next(w for w in WORKLOADS if w.id == worst["id"])
                with phase("profile"):
                    results["profile"] = profile(topo, worker, wl, sizes, say)
        finally:
            if worker is not None:
                worker.close()
            topo.close()
    if with_control_plane:
        say("== control plane")
        with phase("control-plane"):
            results["control_plane"] = control_plane(sizes, quick, say)
    info["loadavg_end"] = os.getloadavg()
    say("   seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    return results
