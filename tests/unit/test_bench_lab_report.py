"""The "Across the overlay" section of docs/benchmarks.md from a fixed --lab results
document: the three variants' medians, what the overlay costs and what the mesh adds on
top, and the section put into the page (replacing an old one, kept when the loopback
comparison regenerates the rest)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `bench`

from bench import lab_report
from bench.lab_bench import VARIANTS, WORKLOAD_IDS
from node.lab_scenario import scenario


def _wl(wid: str, primary: str, unit: str, meds: dict[str, dict[str, float]]) -> dict[str, Any]:
    runs = [{"variant": v, "run": i, **figs} for i in range(3) for v, figs in meds.items()]
    return {
        "id": wid,
        "title": f"title of {wid}",
        "path": "x",
        "kind": "bulk" if wid == "bulk" else "pingpong",
        "primary": primary,
        "unit": unit,
        "higher_is_better": True,
        "latency": ["p50_us"] if wid == "pingpong" else [],
        "latency_unit": "µs",
        "connections": 1,
        "runs": runs,
        "medians": meds,
    }


RESULTS: dict[str, Any] = {
    "lab": True,
    "quick": True,
    "wall_s": 95.0,
    "machine": {"loadavg_start": [3.0, 0, 0], "loadavg_end": [4.0, 0, 0], "cores": 2},
    "sizes": {"runs": 3, "bulk_mib": 64, "seconds": 1.0, "pingpong_rounds": 2000},
    "lab_info": {
        "prefix": "mlt-blab",
        "nodes": 2,
        "underlay": "198.18.40.0/24",
        "overlay_mtu": 1450,
    },
    "notes": ["a note about the run"],
    "workloads": [
        _wl(
            "bulk",
            "mb_per_s",
            "MB/s",
            {
                "direct": {"mb_per_s": 2000.0},
                "direct-overlay": {"mb_per_s": 1000.0},
                "meshlet-overlay": {
                    "mb_per_s": 250.0,
                    "proxy_cpu_s_per_gb": 2.5,
                    "proxy_vcpu": 1.2,
                },
            },
        ),
        _wl(
            "pingpong",
            "rtt_per_s",
            "round trips/s",
            {
                "direct": {"rtt_per_s": 40000.0, "p50_us": 10.0},
                "direct-overlay": {"rtt_per_s": 20000.0, "p50_us": 20.0},
                "meshlet-overlay": {
                    "rtt_per_s": 5000.0,
                    "p50_us": 100.0,
                    "vcpu_per_krps_per_hop": 0.06,
                    "proxy_vcpu": 0.6,
                },
            },
        ),
    ],
}


def test_the_section_shows_each_variant_and_what_the_overlay_and_the_mesh_cost() -> None:
    text = lab_report.render(RESULTS, results_file="bench/results/X-lab.json")
    assert text.startswith("## Across the overlay\n")
    assert "bench/results/X-lab.json" in text and "a --quick run" in text
    assert "overlay MTU 1450" in text and "198.18.40.0/24" in text
    # bulk: overlay/direct 0.50x, mesh/overlay 0.25x, mesh/direct 0.12x (0.125)
    assert "| title of bulk | MB/s | 2,000 | 1,000 | 250 | 0.50x | 0.25x | 0.12x |" in text
    # latency: ratios above 1.0x are slower
    assert "| title of pingpong | p50 µs | 10.0 | 20.0 | 100 | 2.00x | 5.00x | 10.00x |" in text
    assert "| title of bulk | CPU s per GB (both hops) | 2.50 | 1.20 |" in text
    assert "| title of pingpong | vCPU per 1000 req/s per hop | 0.0600 | 0.600 |" in text
    assert "- a note about the run" in text
    assert text.count("| pingpong |") == 9  # every run, 3 per variant


def test_splice_replaces_an_old_section_and_keeps_the_rest_of_the_page() -> None:
    new = lab_report.render(RESULTS, results_file="new.json")
    page = "# B\n\n## Throughput\n\nt\n\n## Charts\n\nc\n"
    first = lab_report.splice(page, lab_report.render(RESULTS, results_file="old.json"))
    assert first.index("## Throughput") < first.index("## Across") < first.index("## Charts")
    again = lab_report.splice(first, new)
    assert "old.json" not in again and "new.json" in again
    assert again.count("## Across the overlay") == 1 and again.endswith("## Charts\n\nc\n")
    # the loopback run regenerates the page: the section it had is carried over as it was
    assert lab_report.extract(again) == new
    assert lab_report.extract(page) is None
    at_end = lab_report.splice("# B\n", new)
    assert at_end == "# B\n\n" + new


def test_the_bench_scenario_declares_every_path_the_lab_bench_dials() -> None:
    bench = scenario("bench")
    keys = {s.key: s for s in bench.services}
    assert {
        "bench/bulk",
        "bench/echo",
        "bench/http",
        "bench/httpl4",
        "bench/grpc",
        "bench/client",
    } == set(keys)
    assert keys["bench/httpl4"].protocol == "tcp"  # wrk through L4 across the overlay too
    assert keys["bench/http"].protocol == "http" and keys["bench/grpc"].protocol == "grpc"
    assert all(s.replicas == 0 for s in bench.services)  # the bench builds its containers
    assert VARIANTS == ("direct", "direct-overlay", "meshlet-overlay")
    assert {"bulk", "pingpong", "http-c1", "http-c32", "http-l4-c32", "grpc-c1", "churn"} <= set(
        WORKLOAD_IDS
    )
