"""`python -m bench [--quick] [--only SUITE]`: run the suites, print a table, write JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import sys
from pathlib import Path

SUITES = {
    "certs": "bench.certs_suite",
    "control-plane": "bench.control_plane_suite",
    "sidecar-cores": "bench.sidecar_cores_suite",
    "relay": "bench.relay_suite",
    "sidecar": "bench.sidecar_suite",
    "http1": "bench.http1_suite",
    "h2": "bench.h2_suite",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--quick", action="store_true", help="short runs (under 2 minutes)")
    parser.add_argument("--only", choices=sorted(SUITES), action="append")
    args = parser.parse_args()
    rows = []
    for name in args.only or SUITES:
        print(f"== {name}", flush=True)
        suite = importlib.import_module(SUITES[name])
        for row in suite.run(args.quick):
            rows.append(row)
            figures = "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()
                if k not in ("suite", "name")
            )
            print(f"   {row['name']:<34} {figures}", flush=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(__file__).parent / "results" / f"{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "when": stamp,
                "quick": args.quick,
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": sys.version.split()[0],
                },
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
