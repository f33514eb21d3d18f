"""The benchmark's arithmetic: percentiles, medians over runs, ratios, Istio's proxy-CPU
unit, the interleaving order, and reading wrk's report. Figures are never judged here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `bench`

from bench.runner import combine_memory_rounds
from bench.stats import (
    interleave,
    median,
    medians,
    parse_duration_s,
    parse_wrk,
    percentile,
    ratio,
    vcpu_per_krps_per_hop,
)

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:41234/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.81ms    3.02ms  41.20ms   91.00%
    Req/Sec     6.21k   512.00     7.00k    70.00%
  Latency Distribution
     50%    1.95ms
     75%    3.10ms
     90%  812.00us
     99%    1.02s
  61804 requests in 5.01s, 50.20MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  12336.33
Transfer/sec:     10.02MB
"""


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_median_ignores_missing_and_non_finite_runs() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert median([float("nan"), 5.0, float("inf"), 1.0]) == 3.0
    assert math.isnan(median([]))


def test_medians_take_each_figure_over_the_runs_that_have_it() -> None:
    runs = [
        {"variant": "meshlet", "rps": 100.0, "p99_ms": 9.0},
        {"variant": "meshlet", "rps": 300.0, "p99_ms": 1.0},
        {"variant": "meshlet", "rps": 200.0},
    ]
    assert medians(runs) == {"rps": 200.0, "p99_ms": 5.0}


def test_ratio_is_nan_rather_than_a_misleading_number() -> None:
    assert ratio(9.0, 10.0) == pytest.approx(0.9)
    for a, b in [(1.0, 0.0), (None, 1.0), (1.0, None), (float("nan"), 1.0), (1.0, math.inf)]:
        assert math.isnan(ratio(a, b))


def test_vcpu_per_krps_per_hop_is_istios_unit() -> None:
    # 2 hops burn 1 CPU second in 10 s while serving 20,000 requests (2,000 req/s):
    # 0.1 vCPU over 2 krps over 2 hops = 0.025 vCPU per 1000 req/s per hop.
    assert vcpu_per_krps_per_hop(1.0, 10.0, 20_000, 2) == pytest.approx(0.025)
    # A sidecar that uses a whole core at 1000 req/s: 1.0 per hop.
    assert vcpu_per_krps_per_hop(2.0, 1.0, 1000, 2) == pytest.approx(1.0)
    assert math.isnan(vcpu_per_krps_per_hop(1.0, 10.0, 0, 2))
    assert math.isnan(vcpu_per_krps_per_hop(1.0, 0.0, 10, 2))


def test_runs_are_interleaved_a_b_c_a_b_c() -> None:
    order = interleave(("direct", "meshlet", "haproxy"), 3)
    assert [v for _, v in order] == ["direct", "meshlet", "haproxy"] * 3
    assert [i for i, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_wrk_durations_in_every_unit() -> None:
    assert parse_duration_s("812.00us") == pytest.approx(812e-6)
    assert parse_duration_s("1.95ms") == pytest.approx(1.95e-3)
    assert parse_duration_s("1.02s") == pytest.approx(1.02)
    assert parse_duration_s("2.00m") == pytest.approx(120.0)
    with pytest.raises(ValueError, match="not a wrk duration"):
        parse_duration_s("fast")


def test_wrk_report_yields_rate_percentiles_and_errors() -> None:
    figures = parse_wrk(WRK_OUTPUT)
    assert figures["rps"] == pytest.approx(12336.33)
    assert figures["p50_ms"] == pytest.approx(1.95)
    assert figures["p90_ms"] == pytest.approx(0.812)
    assert figures["p99_ms"] == pytest.approx(1020.0)
    assert figures["requests"] == 61804
    assert figures["wrk_seconds"] == pytest.approx(5.01)
    assert figures["socket_errors"] == 6
    assert figures["non_2xx"] == 7


def test_wrk_report_without_a_rate_is_an_error_that_shows_the_output() -> None:
    with pytest.raises(ValueError, match=r"(?s)no Requests/sec line.*unable to connect"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_memory_rounds_combine_into_medians_per_hop_and_count() -> None:
    def round_(idle: float, per: float, opened: float) -> dict[str, object]:
        loaded = [
            {"connections": n, "rss_kib": {"outbound": idle + per * n, "inbound": idle},
             "kib_per_conn": {"outbound": per, "inbound": 0.0}, "open_s": opened}
            for n in (1000, 5000)
        ]  # fmt: skip
        return {"idle_kib": {"outbound": idle, "inbound": idle}, "loaded": loaded}

    rounds = [round_(70_000, 30.0, 1.0), round_(90_000, 50.0, 3.0), round_(80_000, 31.0, 2.0)]
    row = combine_memory_rounds(rounds)
    assert row["idle_kib"] == {"outbound": 80_000, "inbound": 80_000}
    assert [r["connections"] for r in row["loaded"]] == [1000, 5000]
    assert row["loaded"][0]["kib_per_conn"] == {"outbound": 31.0, "inbound": 0.0}
    assert row["loaded"][1]["rss_kib"]["outbound"] == 80_000 + 31.0 * 5000
    assert row["loaded"][0]["open_s"] == 2.0
    assert row["rounds"] == rounds  # every round is kept in the results


def test_a_round_cut_short_limits_the_combined_counts() -> None:
    full = {"idle_kib": {"outbound": 1.0}, "loaded": [
        {"connections": n, "rss_kib": {"outbound": 2.0}, "kib_per_conn": {"outbound": 1.0},
         "open_s": 0.1} for n in (1000, 5000)]}  # fmt: skip
    short = {**full, "loaded": full["loaded"][:1]}
    assert [r["connections"] for r in combine_memory_rounds([full, short])["loaded"]] == [1000]
