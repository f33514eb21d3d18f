"""docs/benchmarks.md from a results document: the machine, how it was measured, the
verdict against issue 8's goals (plainly, where meshlet falls short), tables of medians
with ratios to direct and to HAProxy, proxy CPU, memory, the control plane, the profile
and the charts.

For: turning results (plain dicts, as written to bench/results/*.json) into Markdown.
Must never: measure, read files or the clock; the same results render the same text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.stats import ratio

ISTIO_VCPU_PER_KRPS = 0.20


def fmt(v: Any, digits: int = 3) -> str:
    """A figure for a table: 3 significant digits, thousands separated; '—' if missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or (abs(v) >= 100 and v == int(v) and abs(v) < 1e15):
        return f"{int(v):,}"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    decimals = max(0, digits - 1 - mag)
    return f"{v:,.{decimals}f}"


def fmt_ratio(r: float) -> str:
    return "—" if not math.isfinite(r) else f"{r:.2f}x"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    goal: str
    target: str
    measured: str
    met: bool | None  # None: not measured
    aim_met: bool = False

    @property
    def word(self) -> str:
        if self.met is None:
            return "not measured"
        if self.met and self.aim_met:
            return "meets the aim"
        return "meets the goal" if self.met else "**falls short**"


def _med(results: Mapping[str, Any], wid: str, variant: str, key: str) -> float:
    for w in results.get("workloads", []):
        if w["id"] == wid:
            v = w["medians"].get(variant, {}).get(key)
            return float(v) if isinstance(v, int | float) else float("nan")
    return float("nan")


def _vs(results: Mapping[str, Any], wid: str, key: str) -> float:
    return ratio(_med(results, wid, "meshlet", key), _med(results, wid, "haproxy", key))


def _at_least(goal: str, r: float, floor: float, aim: float, target: str) -> Verdict:
    if not math.isfinite(r):
        return Verdict(goal=goal, target=target, measured="—", met=None)
    return Verdict(
        goal=goal, target=target, measured=fmt_ratio(r), met=r >= floor, aim_met=r >= aim
    )


def _largest_load(results: Mapping[str, Any], variant: str) -> dict[str, Any] | None:
    mem = results.get("memory", {}).get("variants", {}).get(variant)
    if not mem or not mem.get("loaded"):
        return None
    return dict(mem["loaded"][-1])


def _cp_row(results: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    for row in results.get("control_plane", []):
        if str(row.get("name", "")).startswith(prefix):
            return dict(row)
    return None


def verdicts(results: Mapping[str, Any]) -> list[Verdict]:
    """Issue 8's "What good looks like", one line each, judged on this run's medians."""
    out = [
        _at_least(
            "L4 over mTLS: bulk MB/s vs HAProxy tcp mode",
            _vs(results, "bulk", "mb_per_s"),
            1.0,
            1.2,
            "≥ 1.0x (aim 1.2x)",
        ),
        _at_least(
            "L4 over mTLS: wrk through L4 (32 connections) vs HAProxy tcp mode",
            _vs(results, "http-l4-c32", "rps"),
            1.0,
            1.2,
            "≥ 1.0x (aim 1.2x)",
        ),
        _at_least(
            "HTTP/1.1 over mTLS, 32 connections: req/s vs HAProxy http mode",
            _vs(results, "http-c32", "rps"),
            0.8,
            1.0,
            "≥ 0.8x (aim 1.0x)",
        ),
    ]
    p99 = _vs(results, "http-c32", "p99_ms")
    out.append(
        Verdict(
            goal="HTTP/1.1 over mTLS, 32 connections: p99 vs HAProxy http mode",
            target="≤ 1.5x",
            measured=fmt_ratio(p99),
            met=None if not math.isfinite(p99) else p99 <= 1.5,
            aim_met=math.isfinite(p99) and p99 <= 1.0,
        )
    )
    out.append(
        _at_least(
            "New connections per second through the path vs HAProxy",
            _vs(results, "churn", "conns_per_s"),
            1.0,
            5.0,
            "≥ 1.0x (aim 5x)",
        )
    )
    m, h = _largest_load(results, "meshlet"), _largest_load(results, "haproxy")
    if m and h:
        mk = max(m["kib_per_conn"].values())
        hk = max(h["kib_per_conn"].values())
        out.append(
            Verdict(
                goal=f"Idle proxied connection memory ({m['connections']:,} connections, worst hop)",
                target="≤ HAProxy's (aim < 16 KiB)",
                measured=f"{fmt(mk)} KiB vs HAProxy {fmt(hk)} KiB",
                met=mk <= hk,
                aim_met=mk < 16,
            )
        )
    else:
        out.append(
            Verdict(
                goal="Idle proxied connection memory", target="≤ HAProxy's", measured="—", met=None
            )
        )
    cpu = _med(results, "http-c32", "meshlet", "vcpu_per_krps_per_hop")
    out.append(
        Verdict(
            goal="Proxy CPU per sidecar, HTTP/1.1 at 32 connections, metrics and access log on",
            target=f"< {ISTIO_VCPU_PER_KRPS:.2f} vCPU per 1000 req/s",
            measured="—" if not math.isfinite(cpu) else f"{cpu:.3f} vCPU per 1000 req/s",
            met=None if not math.isfinite(cpu) else cpu < ISTIO_VCPU_PER_KRPS,
        )
    )
    mem = results.get("memory", {}).get("variants", {}).get("meshlet")
    if mem:
        worst = max(mem["idle_kib"].values()) / 1024
        out.append(
            Verdict(
                goal="Sidecar RSS idle (larger of the two hops)",
                target="< 40 MiB",
                measured=f"{fmt(worst)} MiB",
                met=worst < 40,
            )
        )
    reg = _cp_row(results, "registration_to_")
    if reg:
        p99_ms = float(reg["last_watcher_p99_ms"])
        watchers = str(reg["name"]).removeprefix("registration_to_").removesuffix("_watchers")
        out.append(
            Verdict(
                goal=f"Registration to the last of {watchers} watchers, p99",
                target="< 250 ms (1,000 watchers)",
                measured=f"{fmt(p99_ms)} ms",
                met=p99_ms < 250,
            )
        )
    return out


def _from_docs(repo_path: str) -> str:
    """A repository path as a link from docs/benchmarks.md."""
    return repo_path.removeprefix("docs/") if repo_path.startswith("docs/") else f"../{repo_path}"


def _load_caveat(results: Mapping[str, Any]) -> str:
    m = results.get("machine", {})
    start = m.get("loadavg_start", [float("nan")])[0]
    end = m.get("loadavg_end", [float("nan")])[0]
    cores = m.get("cores") or 0
    busy = cores and max(start, end) > 0.5 * cores
    text = (
        f"The machine is shared: its 1-minute load average was {fmt(start)} at the start "
        f"and {fmt(end)} at the end ({cores} cores)"
    )
    return text + (", so other work ran alongside this measurement." if busy else ".")


def _machine(results: Mapping[str, Any]) -> list[str]:
    m = results.get("machine", {})
    v = m.get("versions", {})
    load = m.get("loadavg_start", [float("nan")])
    load_end = m.get("loadavg_end", [float("nan")])
    return [
        "| CPU | cores | kernel | Python | OpenSSL | HAProxy | nginx | wrk | meshlet |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {m.get('cpu_model', '?')} | {m.get('cores', '?')} | {m.get('kernel', '?')} "
        f"| {v.get('python', '?')} | {v.get('openssl', '?')} | {v.get('haproxy', '?')} "
        f"| {v.get('nginx', '?')} | {v.get('wrk', '?')} | {v.get('meshlet', '?')} |",
        "",
        f"Load average (1 min) at the start {fmt(load[0])}, at the end {fmt(load_end[0])}.",
    ]


def _figure_rows(w: Mapping[str, Any]) -> list[str]:
    med = w["medians"]
    keys = [(w["primary"], w["unit"], w["higher_is_better"])]
    unit = w.get("latency_unit", "")
    keys += [(k, f"{k.split('_')[0]} {unit}", False) for k in w.get("latency", [])]
    rows = []
    for key, label, _higher in keys:
        d, m, h = (med.get(v, {}).get(key) for v in ("direct", "meshlet", "haproxy"))
        rows.append(
            f"| {w['title']} | {label} | {fmt(d)} | {fmt(m)} | {fmt(h)} "
            f"| {fmt_ratio(ratio(m, d))} | {fmt_ratio(ratio(m, h))} | {fmt_ratio(ratio(h, d))} |"
        )
    return rows


def _cpu_rows(workloads: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for w in workloads:
        med = w["medians"]
        key = "proxy_cpu_s_per_gb" if w["kind"] == "bulk" else "vcpu_per_krps_per_hop"
        unit = "CPU s per GB (both hops)" if w["kind"] == "bulk" else "vCPU per 1000 req/s per hop"
        m = med.get("meshlet", {}).get(key)
        h = med.get("haproxy", {}).get(key)
        rows.append(f"| {w['title']} | {unit} | {fmt(m)} | {fmt(h)} | {fmt_ratio(ratio(m, h))} |")
    return rows


def _memory(results: Mapping[str, Any]) -> list[str]:
    mem = results.get("memory")
    if not mem:
        return ["Not measured in this run."]
    vs = mem["variants"]
    cols = [(v, hop) for v in ("meshlet", "haproxy") for hop in ("outbound", "inbound")]
    head = "| | " + " | ".join(f"{v} {hop}" for v, hop in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    lines.append(
        "| RSS idle (MiB) | "
        + " | ".join(fmt(vs[v]["idle_kib"][hop] / 1024) for v, hop in cols)
        + " |"
    )
    for i, n in enumerate(mem["counts"]):
        cells = []
        for v, hop in cols:
            loaded = vs[v]["loaded"]
            cells.append(fmt(loaded[i]["kib_per_conn"][hop]) if i < len(loaded) else "—")
        lines.append(f"| KiB per idle connection at {n:,} | " + " | ".join(cells) + " |")
    for i, n in enumerate(mem["counts"]):
        cells = []
        for v, hop in cols:
            loaded = vs[v]["loaded"]
            cells.append(fmt(loaded[i]["rss_kib"][hop] / 1024) if i < len(loaded) else "—")
        lines.append(f"| RSS with {n:,} (MiB) | " + " | ".join(cells) + " |")
    return lines


def _control_plane(results: Mapping[str, Any]) -> list[str]:
    rows = results.get("control_plane")
    if not rows:
        return ["Not measured in this run."]
    lines = ["| what | figures |", "|---|---|"]
    for row in rows:
        figures = ", ".join(
            f"{k.replace('_', ' ')} {fmt(v)}" for k, v in row.items() if k not in ("suite", "name")
        )
        lines.append(f"| {str(row['name']).replace('_', ' ')} | {figures} |")
    return lines


def _runs(workloads: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| workload | run | variant | headline | latency | proxy CPU | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        for r in w["runs"]:
            lat = ", ".join(f"{k} {fmt(r[k])}" for k in w.get("latency", []) if k in r)
            cpu = (
                f"{fmt(r['proxy_cpu_s'])} s"
                if "proxy_cpu_s" in r and r.get("variant") != "direct"
                else ""
            )
            errs = sum(float(r.get(k, 0)) for k in ("errors", "socket_errors", "non_2xx"))
            lines.append(
                f"| {w['id']} | {r['run'] + 1} | {r['variant']} | {fmt(r.get(w['primary']))} "
                f"{w['unit']} | {lat} | {cpu} | {fmt(errs) if errs else ''} |"
            )
    return lines


def render(results: Mapping[str, Any], *, results_file: str, charts: Sequence[str] = ()) -> str:
    """The whole of docs/benchmarks.md."""
    workloads = results.get("workloads", [])
    sizes = results.get("sizes", {})
    vs = verdicts(results)
    short = [v for v in vs if v.met is False]
    when = results.get("when", "?")
    mode = "a quick run, `make bench QUICK=1`" if results.get("quick") else "a full run"
    out = [
        "# Benchmarks: meshlet against the direct path and HAProxy",
        "",
        f"Generated by `make bench` from `{results_file}` ({mode}, {when}). Do not edit by "
        "hand: run `make bench` again (or `python -m bench --report-only FILE`).",
        "",
        "> **Caveat.** Absolute numbers on a shared 2-core machine drift with whatever "
        "else runs; ratios measured side by side, interleaved, are what we quote. "
        + _load_caveat(results)
        + " The client, both proxies and the server share the same cores, so the load "
        "generators (wrk, the Python gRPC client) compete with the proxies they measure.",
        "",
    ]
    for note in results.get("notes", []):
        out += [f"> {note}", ""]
    out += ["## Machine", "", *_machine(results), ""]
    out += [
        "## How it was measured",
        "",
        "- **direct**: client → server, no proxy (the physical limit).",
        "- **meshlet**: client → outbound sidecar → inbound sidecar → server, explicit mode "
        "on 127.0.0.1, mutual TLS 1.3 (ECDSA P-256 SVIDs from the control plane's CA) "
        "between the sidecars, metrics and access logs on. Each port's protocol is declared "
        "on the service: tcp (L4 relay), http (HTTP/1.1 per request) or grpc.",
        "- **haproxy**: HAProxy two hops doing the same job with the same mTLS: TLS 1.3 "
        "only, ECDSA P-256 certificates from the bench's mesh CA, peer verification both "
        "ways, one thread per hop, `mode tcp` for L4 paths and `mode http` for L7; the "
        "configs are generated by the harness and kept in "
        "[bench/haproxy/outbound.cfg](../bench/haproxy/outbound.cfg) and "
        "[bench/haproxy/inbound.cfg](../bench/haproxy/inbound.cfg).",
        "- gRPC: HAProxy runs `mode http` with HTTP/2 on every leg (`proto h2`, ALPN h2 "
        "between the hops). Both proxies allow 8,000 concurrent connections per path (the "
        "sidecars' breaker `max_connections`, HAProxy's `maxconn`).",
        "- Memory is measured before the other workloads, in interleaved rounds "
        "(meshlet, haproxy, meshlet, …; as many as the runs), each round on freshly "
        "started hops; the table shows the medians. The control-plane figures are meshlet's alone (no comparison); its "
        "`rss empty` is read after the watcher fan-out, just before the endpoints are added.",
        f"- {sizes.get('runs', '?')} runs per variant, interleaved (direct, meshlet, haproxy, "
        "direct, …); the tables show medians. Proxy CPU is user + system time of both hops' "
        "processes from /proc/PID/stat during each run, reported as vCPU per 1000 "
        "requests/s per hop (Istio's unit): CPU seconds ÷ wall seconds ÷ (requests/s ÷ "
        "1000) ÷ 2 hops.",
        f"- Sizes: bulk {sizes.get('bulk_mib', '?'):,} MiB each way, "
        f"{sizes.get('seconds', '?'):g} s per wrk/gRPC/churn run, "
        f"{sizes.get('pingpong_rounds', '?'):,} ping-pong round trips per run.",
        "- Ratios: for throughput above 1.0x is faster; for latency and CPU above 1.0x is "
        "slower or costlier.",
    ]
    if results.get("grpc_mode"):
        out.append(f"- gRPC through meshlet went by: {results['grpc_mode']}.")
    out.append("")
    out += ['## Against the goals (issue 8, "What good looks like")', ""]
    out += ["| goal | target | measured | verdict |", "|---|---|---|---|"]
    out += [f"| {v.goal} | {v.target} | {v.measured} | {v.word} |" for v in vs]
    out.append("")
    out += ["### Where meshlet falls short", ""]
    if short:
        out += [f"- Falls short: {v.goal}: {v.measured} (target {v.target})." for v in short]
    else:
        out.append("- Nowhere in this run: every measured goal is met.")
    prof = results.get("profile")
    if prof and prof.get("files"):
        links = ", ".join(
            f"[{hop}]({_from_docs(path)})"
            for hop, path in sorted(prof["files"].items(), reverse=True)
        )
        out += [
            "",
            f"The workload where meshlet is furthest behind HAProxy is **{prof['workload']}**; "
            f"a py-spy profile of both sidecars while it ran ({fmt(prof.get('seconds'))} s, "
            f"flamegraphs): {links}.",
        ]
    elif prof:
        out += ["", f"Profile of {prof.get('workload')}: not taken ({prof.get('error')})."]
    out.append("")
    out += [
        "## Throughput and latency (medians)",
        "",
        "| workload | figure | direct | meshlet | HAProxy | meshlet/direct | meshlet/HAProxy "
        "| HAProxy/direct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        out += _figure_rows(w)
    out.append("")
    out += [
        "## Proxy CPU (medians, both hops measured)",
        "",
        "| workload | unit | meshlet | HAProxy | meshlet/HAProxy |",
        "|---|---|---|---|---|",
        *_cpu_rows(workloads),
        "",
    ]
    out += [
        "## Memory: RSS idle and with idle proxied connections (echo path)",
        "",
        *_memory(results),
        "",
    ]
    out += ["## Control plane", "", *_control_plane(results), ""]
    if charts:
        out += ["## Charts", ""]
        out += [f"![{c.rsplit('/', 1)[-1].removesuffix('.png')}]({c})" for c in charts]
        out.append("")
    if workloads:
        out += ["## Every run", "", *_runs(workloads), ""]
    return "\n".join(out)
