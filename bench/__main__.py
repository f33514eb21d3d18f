"""`python -m bench [--quick]` (`make bench [QUICK=1]`): meshlet against the direct path
and HAProxy, side by side; writes bench/results/<timestamp>.json and regenerates
docs/benchmarks.md with its charts (docs/benchmarks/*.png).

`--only SUITE` runs one of the older meshlet-only suites instead (certs, control-plane,
sidecar-cores, relay, sidecar, http1, h2); `--report-only FILE` re-renders the docs from
a results file; `--lab` runs the workloads across the lab's VXLAN overlay
(bench/lab_bench.py) and regenerates the page's "Across the overlay" section.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import REPO, BenchError
from bench.workloads import FULL, QUICK, WORKLOAD_BY_ID

SUITES = {
    "certs": "bench.certs_suite",
    "control-plane": "bench.control_plane_suite",
    "sidecar-cores": "bench.sidecar_cores_suite",
    "relay": "bench.relay_suite",
    "sidecar": "bench.sidecar_suite",
    "http1": "bench.http1_suite",
    "h2": "bench.h2_suite",
}
RESULTS = Path(__file__).parent / "results"
DOC = REPO / "docs" / "benchmarks.md"
CHARTS = REPO / "docs" / "benchmarks"


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _write(doc: dict[str, Any], stamp: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(doc, indent=2, default=str))
    return out


def _suites(names: list[str], quick: bool) -> None:
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        suite = importlib.import_module(SUITES[name])
        for row in suite.run(quick):
            rows.append(row)
            figures = "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()
                if k not in ("suite", "name")
            )
            print(f"   {row['name']:<34} {figures}", flush=True)
    stamp = _stamp()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    machine["python"] = sys.version.split()[0]
    out = _write({"when": stamp, "quick": quick, "machine": machine, "results": rows}, stamp)
    print(f"wrote {out}")


def render_docs(results: dict[str, Any], results_file: Path) -> Path:
    """docs/benchmarks.md and its charts from one results document."""
    from bench import charts, lab_report, report

    drawn = charts.draw_all(results, CHARTS)
    rel = [str(p.relative_to(DOC.parent)) for p in drawn]
    try:
        shown = str(results_file.resolve().relative_to(REPO))
    except ValueError:
        shown = str(results_file)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = report.render(results, results_file=shown, charts=rel)
    lab_section = lab_report.extract(DOC.read_text()) if DOC.exists() else None
    if lab_section:  # the --lab run's section stays until the next --lab run
        text = lab_report.splice(text, lab_section)
    DOC.write_text(text)
    return DOC


def render_lab_section(results: dict[str, Any], results_file: Path) -> Path:
    """The "Across the overlay" section of docs/benchmarks.md from a --lab results file."""
    from bench import lab_report

    try:
        shown = str(results_file.resolve().relative_to(REPO))
    except ValueError:
        shown = str(results_file)
    section = lab_report.render(results, results_file=shown)
    old = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(lab_report.splice(old, section))
    return DOC


def _lab_available() -> bool:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "meshlet", "lab", "--help"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _summary(results: dict[str, Any]) -> None:
    from bench import report
    from bench.stats import ratio

    print("== medians (meshlet/direct, meshlet/HAProxy)")
    for w in results["workloads"]:
        med, key = w["medians"], w["primary"]
        m, d, h = (med[v].get(key) for v in ("meshlet", "direct", "haproxy"))
        print(
            f"   {w['id']:<12} meshlet {report.fmt(m):>9} {w['unit']:<14}"
            f" {report.fmt_ratio(ratio(m, d)):>6} of direct, {report.fmt_ratio(ratio(m, h)):>6}"
            " of HAProxy"
        )
    for v in report.verdicts(results):
        print(f"   goal: {v.goal}: {v.measured} (target {v.target}) — {v.word.strip('*')}")


def _lab(args: argparse.Namespace) -> int:
    """`--lab`: the workloads across the lab's VXLAN overlay (bench/lab_bench.py)."""
    if not _lab_available():
        raise BenchError(
            "--lab: the lab is not available (`meshlet lab` is not built); "
            "run `make bench` without --lab for the loopback comparison"
        )
    from bench import lab_bench, lab_report
    from bench.report import fmt, fmt_ratio
    from bench.stats import ratio

    sizes = QUICK if args.quick else FULL
    if args.runs:
        if args.runs < 3:
            raise BenchError(f"--runs {args.runs}: medians need at least 3 runs per variant")
        sizes = dataclasses.replace(sizes, runs=args.runs)
    t0 = time.perf_counter()
    stamp = _stamp()
    results = lab_bench.run(sizes, quick=args.quick, only=tuple(args.workload or ()))
    results["when"] = stamp
    results["wall_s"] = time.perf_counter() - t0
    out = _write(results, f"{stamp}-lab")
    print(f"wrote {out}")
    print("== medians across the overlay (overlay/direct, mesh/overlay)")
    for w in results["workloads"]:
        med, key = w["medians"], w["primary"]
        d, o, m = (med[v].get(key) for v in lab_report.VARIANTS)
        print(
            f"   {w['id']:<12} meshlet-overlay {fmt(m):>9} {w['unit']:<14}"
            f" overlay/direct {fmt_ratio(ratio(o, d)):>6},"
            f" mesh/overlay {fmt_ratio(ratio(m, o)):>6}"
        )
    if args.workload:
        print("docs/benchmarks.md left as it was (--workload ran only part of it)")
    else:
        print(f"wrote {render_lab_section(results, out)}")
    print(f"bench --lab took {results['wall_s']:.0f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="short runs (under 2 minutes)")
    parser.add_argument(
        "--only", choices=sorted(SUITES), action="append", help="run an older suite instead"
    )
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOAD_BY_ID),
        action="append",
        help="only these comparison workloads (docs are not regenerated, no profile)",
    )
    parser.add_argument("--runs", type=int, help="runs per variant (default 3; at least 3)")
    parser.add_argument("--lab", action="store_true", help="across the lab's VXLAN overlay")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory workload")
    parser.add_argument(
        "--no-control-plane", action="store_true", help="skip the control-plane figures"
    )
    parser.add_argument(
        "--report-only", type=Path, metavar="FILE", help="re-render docs from a results file"
    )
    args = parser.parse_args()
    try:
        if args.report_only:
            results = json.loads(args.report_only.read_text())
            if results.get("lab"):
                print(f"wrote {render_lab_section(results, args.report_only)}")
                return 0
            print(f"wrote {render_docs(results, args.report_only)}")
            return 0
        if args.only:
            _suites(args.only, args.quick)
            return 0
        if args.lab:
            return _lab(args)
        from bench import runner

        sizes = QUICK if args.quick else FULL
        if args.runs:
            if args.runs < 3:
                raise BenchError(f"--runs {args.runs}: medians need at least 3 runs per variant")
            sizes = dataclasses.replace(sizes, runs=args.runs)
        t0 = time.perf_counter()
        stamp = _stamp()
        results = runner.run(
            sizes,
            quick=args.quick,
            only=args.workload or (),
            with_profile=not args.no_profile and not args.workload,  # profiles go to docs/
            with_memory=not args.no_memory,
            with_control_plane=not args.no_control_plane,
        )
        results["when"] = stamp
        results["wall_s"] = time.perf_counter() - t0
        out = _write(results, stamp)
        print(f"wrote {out}")
        _summary(results)
        if args.workload:
            print("docs/benchmarks.md left as it was (--workload ran only part of it)")
        else:
            print(f"wrote {render_docs(results, out)}")
        print(f"bench took {results['wall_s']:.0f} s")
    except BenchError as e:
        print(f"make bench: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
