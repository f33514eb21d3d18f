"""PNG charts for docs/benchmarks.md (matplotlib, no display): throughput relative to
the direct path, latency percentiles, and proxy CPU per 1000 requests/s per hop.

For: drawing results that were already measured.
Must never: measure anything; it only reads the results document.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

COLORS = {"direct": "#8c8c8c", "meshlet": "#1f77b4", "haproxy": "#ff7f0e"}
VARIANTS = ("direct", "meshlet", "haproxy")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else 0.0


def throughput(results: Mapping[str, Any], out: Path) -> Path:
    plt = _plt()
    wls = results["workloads"]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(wls) * 3 + 1.2))
    y = 0.0
    ticks, labels = [], []
    for w in reversed(wls):
        med = w["medians"]
        direct = _finite(med["direct"].get(w["primary"]))
        for i, v in enumerate(reversed(VARIANTS)):
            value = _finite(med[v].get(w["primary"]))
            rel = value / direct if direct else 0.0
            ax.barh(y + i * 0.28, rel, height=0.26, color=COLORS[v], label=v if y == 0 else None)
            ax.text(rel + 0.01, y + i * 0.28, f"{value:,.0f} {w['unit']}", va="center", fontsize=7)
        ticks.append(y + 0.28)
        labels.append(w["id"])
        y += 1.1
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("throughput relative to the direct path (median; higher is better)")
    ax.axvline(1.0, color="#444", linewidth=0.6)
    ax.set_title("Throughput: direct vs meshlet vs HAProxy (two hops, mTLS)")
    ax.legend(loc="lower right")
    ax.set_xlim(0, max(1.35, ax.get_xlim()[1] * 1.15))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def latency(results: Mapping[str, Any], out: Path) -> Path | None:
    plt = _plt()
    wls = [w for w in results["workloads"] if w.get("latency")]
    if not wls:
        return None
    cols = min(3, len(wls))
    rows = (len(wls) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.6, 3.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(wls) :]:
        ax.set_visible(False)
    for ax, w in zip(flat, wls, strict=False):
        keys = w["latency"]
        for i, v in enumerate(VARIANTS):
            vals = [_finite(w["medians"][v].get(k)) for k in keys]
            xs = [j + (i - 1) * 0.27 for j in range(len(keys))]
            ax.bar(xs, vals, width=0.25, color=COLORS[v], label=v)
        ax.set_xticks(range(len(keys)), [k.split("_")[0] for k in keys])
        ax.set_yscale("log")
        ax.set_title(w["id"], fontsize=9)
        ax.set_ylabel(w.get("latency_unit", ""), fontsize=8)
        ax.tick_params(labelsize=7)
    flat[0].legend(fontsize=7)
    fig.suptitle("Latency percentiles (medians of runs; lower is better; log scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cpu(results: Mapping[str, Any], out: Path) -> Path | None:
    plt = _plt()
    wls = [w for w in results["workloads"] if w["kind"] != "bulk"]
    if not wls:
        return None
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for i, v in enumerate(("meshlet", "haproxy")):
        vals = [_finite(w["medians"][v].get("vcpu_per_krps_per_hop")) for w in wls]
        ax.bar(
            [j + (i - 0.5) * 0.38 for j in range(len(wls))], vals, 0.36, color=COLORS[v], label=v
        )
    ax.axhline(0.20, color="#c00", linestyle="--", linewidth=0.8, label="Istio sidecar (0.20)")
    ax.set_xticks(range(len(wls)), [w["id"] for w in wls], fontsize=8)
    ax.set_ylabel("vCPU per 1000 req/s per hop")
    ax.set_title("Proxy CPU per request (median; lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_all(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Every chart that has data; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not results.get("workloads"):
        return []
    drawn = [
        throughput(results, out_dir / "throughput.png"),
        latency(results, out_dir / "latency.png"),
        cpu(results, out_dir / "cpu.png"),
    ]
    return [p for p in drawn if p is not None]
