"""docs/benchmarks.md from a small fixed results document: the tables carry medians and
ratios, every goal of issue 8 gets a verdict, shortfalls are stated plainly, and the
charts are real PNG files."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `bench`

from bench import charts, report


def _wl(
    wid: str, title: str, primary: str, unit: str, meds: dict[str, dict[str, float]], **kw: Any
) -> dict[str, Any]:
    runs = [{"variant": v, "run": i, **figs} for i in range(3) for v, figs in meds.items()]
    return {
        "id": wid,
        "title": title,
        "path": "x",
        "kind": kw.get("kind", "wrk"),
        "primary": primary,
        "unit": unit,
        "higher_is_better": True,
        "latency": kw.get("latency", []),
        "latency_unit": kw.get("latency_unit", ""),
        "connections": 1,
        "runs": runs,
        "medians": meds,
    }


RESULTS: dict[str, Any] = {
    "when": "20260101T000000Z",
    "quick": True,
    "machine": {
        "cpu_model": "Test CPU",
        "cores": 2,
        "kernel": "6.1.0",
        "loadavg_start": [3.5, 0, 0],
        "loadavg_end": [4.0, 0, 0],
        "versions": {"python": "3.11.7", "haproxy": "HAProxy version 2.6.12", "meshlet": "abc1234"},
    },
    "sizes": {"bulk_mib": 64, "seconds": 1.0, "pingpong_rounds": 2000, "runs": 3},
    "notes": ["--quick: bulk 64 MiB each way (not 1 GiB)"],
    "grpc_mode": "L4 relay (the sidecar does not carry gRPC per request yet)",
    "workloads": [
        _wl(
            "bulk",
            "L4 bulk, each way",
            "mb_per_s",
            "MB/s",
            {
                "direct": {"mb_per_s": 2000.0},
                "meshlet": {"mb_per_s": 450.0, "proxy_cpu_s_per_gb": 2.0, "proxy_cpu_s": 0.3},
                "haproxy": {"mb_per_s": 500.0, "proxy_cpu_s_per_gb": 1.6, "proxy_cpu_s": 0.2},
            },
            kind="bulk",
        ),
        _wl(
            "http-c32",
            "HTTP/1.1 keep-alive (wrk → nginx), L7, 32 connections",
            "rps",
            "req/s",
            {
                "direct": {"rps": 40000.0, "p50_ms": 0.5, "p99_ms": 0.9},
                "meshlet": {
                    "rps": 9000.0,
                    "p50_ms": 2.0,
                    "p99_ms": 3.0,
                    "vcpu_per_krps_per_hop": 0.1,
                },
                "haproxy": {
                    "rps": 10000.0,
                    "p50_ms": 1.0,
                    "p99_ms": 1.0,
                    "vcpu_per_krps_per_hop": 0.04,
                },
            },
            latency=["p50_ms", "p99_ms"],
            latency_unit="ms",
        ),
        _wl(
            "churn",
            "Connection churn",
            "conns_per_s",
            "conn/s",
            {
                "direct": {"conns_per_s": 9000.0},
                "meshlet": {"conns_per_s": 1000.0, "vcpu_per_krps_per_hop": 2.0},
                "haproxy": {"conns_per_s": 200.0, "vcpu_per_krps_per_hop": 1.0},
            },
            kind="churn",
        ),
    ],
    "memory": {
        "counts": [1000, 5000],
        "variants": {
            "meshlet": {
                "idle_kib": {"outbound": 51200, "inbound": 40960},
                "loaded": [
                    {
                        "connections": 1000,
                        "rss_kib": {"outbound": 91200, "inbound": 80960},
                        "kib_per_conn": {"outbound": 40.0, "inbound": 40.0},
                    },
                    {
                        "connections": 5000,
                        "rss_kib": {"outbound": 251200, "inbound": 240960},
                        "kib_per_conn": {"outbound": 40.0, "inbound": 39.0},
                    },
                ],
            },
            "haproxy": {
                "idle_kib": {"outbound": 15000, "inbound": 20000},
                "loaded": [
                    {
                        "connections": 1000,
                        "rss_kib": {"outbound": 60000, "inbound": 65000},
                        "kib_per_conn": {"outbound": 45.0, "inbound": 45.0},
                    },
                    {
                        "connections": 5000,
                        "rss_kib": {"outbound": 240000, "inbound": 245000},
                        "kib_per_conn": {"outbound": 45.0, "inbound": 45.0},
                    },
                ],
            },
        },
    },
    "control_plane": [
        {
            "suite": "control-plane",
            "name": "snapshot_10k_endpoints",
            "bytes": 3230116,
            "encode_ms_p50": 84.4,
        },
        {
            "suite": "control-plane",
            "name": "registration_to_1000_watchers",
            "registrations": 20,
            "last_watcher_p50_ms": 60.0,
            "last_watcher_p99_ms": 100.0,
        },
        {"suite": "control-plane", "name": "rss_at_10000_endpoints", "rss_mib": 106.0},
    ],
    "profile": {
        "workload": "http-c32",
        "seconds": 8.0,
        "files": {
            "outbound": "docs/benchmarks/profile-http-c32-outbound.svg",
            "inbound": "docs/benchmarks/profile-http-c32-inbound.svg",
        },
        "errors": [],
    },
}


def _render(results: dict[str, Any] = RESULTS) -> str:
    return report.render(
        results,
        results_file="bench/results/20260101T000000Z.json",
        charts=["benchmarks/throughput.png", "benchmarks/latency.png"],
    )


def _verdict(text: str, goal_start: str) -> str:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {goal_start}"))
    return line.rsplit("|", 2)[-2].strip()


def test_the_medians_table_has_every_variant_and_both_ratios() -> None:
    text = _render()
    assert (
        "| workload | figure | direct | meshlet | HAProxy | meshlet/direct | meshlet/HAProxy | HAProxy/direct |"
        in text
    )
    assert "| L4 bulk, each way | MB/s | 2,000 | 450 | 500 | 0.23x | 0.90x | 0.25x |" in text
    assert (
        "| HTTP/1.1 keep-alive (wrk → nginx), L7, 32 connections | p99 ms | 0.900 | 3.00 | 1.00 | 3.33x | 3.00x | 1.11x |"
        in text
    )


def test_each_goal_gets_a_verdict_from_the_medians() -> None:
    text = _render()
    assert _verdict(text, "L4 over mTLS: bulk") == "**falls short**"
    assert _verdict(text, "HTTP/1.1 over mTLS, 32 connections: req/s") == "meets the goal"
    assert _verdict(text, "HTTP/1.1 over mTLS, 32 connections: p99") == "**falls short**"
    assert _verdict(text, "New connections per second") == "meets the aim"
    assert _verdict(text, "Idle proxied connection memory (5,000") == "meets the goal"
    assert _verdict(text, "Proxy CPU per sidecar") == "meets the goal"
    assert _verdict(text, "Sidecar RSS idle") == "**falls short**"
    assert _verdict(text, "Registration to the last of 1000 watchers") == "meets the goal"
    # No wrk-through-L4 workload in these results: said, not guessed.
    assert _verdict(text, "L4 over mTLS: wrk through L4") == "not measured"


def test_shortfalls_are_stated_plainly_with_the_profile_linked() -> None:
    text = _render()
    section = text.split("### Where meshlet falls short", 1)[1].split("\n## ", 1)[0]
    assert (
        "- Falls short: L4 over mTLS: bulk MB/s vs HAProxy tcp mode: 0.90x (target ≥ 1.0x (aim 1.2x))."
        in section
    )
    assert (
        "- Falls short: HTTP/1.1 over mTLS, 32 connections: p99 vs HAProxy http mode: 3.00x"
        in section
    )
    assert (
        "- Falls short: Sidecar RSS idle (larger of the two hops): 50.0 MiB (target < 40 MiB)."
        in section
    )
    assert "Proxy CPU" not in section
    assert "[outbound](benchmarks/profile-http-c32-outbound.svg)" in section
    assert "[inbound](benchmarks/profile-http-c32-inbound.svg)" in section


def test_a_run_that_meets_every_goal_says_so() -> None:
    good = copy.deepcopy(RESULTS)
    for w in good["workloads"]:
        w["medians"]["meshlet"] = {**w["medians"]["haproxy"], **{"vcpu_per_krps_per_hop": 0.05}}
    good["workloads"][0]["medians"]["meshlet"]["mb_per_s"] = 700.0
    good["memory"]["variants"]["meshlet"]["idle_kib"] = {"outbound": 30000, "inbound": 30000}
    text = _render(good)
    assert "- Nowhere in this run: every measured goal is met." in text
    assert "**falls short**" not in text


def test_machine_caveat_notes_memory_control_plane_and_charts_appear() -> None:
    text = _render()
    assert "| Test CPU | 2 | 6.1.0 | 3.11.7 |" in text
    assert (
        "load average was 3.50 at the start and 4.00 at the end (2 cores), so other work ran alongside"
        in text
    )
    assert "> --quick: bulk 64 MiB each way (not 1 GiB)" in text
    assert "gRPC through meshlet went by: L4 relay" in text
    assert "| RSS idle (MiB) | 50.0 | 40.0 | 14.6 | 19.5 |" in text
    assert "| KiB per idle connection at 5,000 | 40.0 | 39.0 | 45.0 | 45.0 |" in text
    assert "| registration to 1000 watchers |" in text and "last watcher p99 ms 100" in text
    assert "![throughput](benchmarks/throughput.png)" in text
    assert "[bench/haproxy/outbound.cfg](../bench/haproxy/outbound.cfg)" in text
    assert text.count("| bulk | ") == 9  # every run listed


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (12345.6, "12,346"),
        (0.01234, "0.0123"),
        (5, "5"),
        (float("nan"), "—"),
        (None, "—"),
        (0.0, "0"),
    ],
)
def test_figures_are_shown_to_three_significant_digits(value: Any, shown: str) -> None:
    assert report.fmt(value) == shown


def test_charts_are_png_files(tmp_path: Path) -> None:
    drawn = charts.draw_all(RESULTS, tmp_path)
    assert {p.name for p in drawn} == {"throughput.png", "latency.png", "cpu.png"}
    for p in drawn:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 5000
