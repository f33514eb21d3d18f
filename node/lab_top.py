"""`meshlet lab top`: scrape every sidecar's /stats/prometheus (from inside its container's
namespace) and show the per-service table, refreshing; ``--once`` prints one and exits.

For: ``scrape`` (every replica's sidecar, in parallel, each bounded by a 3 s timeout; a
sidecar that does not answer is shown as such), ``client_view`` (the load container's own
counts, GET /stats of its app: what the client saw, the caption under the table),
``snapshot`` (one table from two scrapes) and ``top`` (the live loop: a scrape every
``interval``, rates over the last ``window`` seconds; Ctrl-C or ``seconds`` ends it).

Must never: change the lab (it only reads the journal and scrapes), or wait unbounded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from node import lab_netns as nsio
from node import lab_table
from node.lab import Lab
from node.lab_scenario import SIDECAR_ADMIN_PORT

SCRAPE_TIMEOUT_S = 3.0


def views(lab: Lab) -> list[lab_table.ServiceView]:
    state = lab.state()
    out = []
    for s in state.services:
        if s.get("client"):
            continue
        reps = []
        for r in state.replicas(str(s["key"])):
            apps = [p for p in state.processes(netns=str(r["netns"])) if p.get("role") == "app"]
            reps.append(
                lab_table.ReplicaView(
                    name=str(r["name"]),
                    node=str(r.get("node", "?")),
                    app_alive=all(lab.process_alive(p) for p in apps),
                )
            )
        out.append(
            lab_table.ServiceView(
                key=str(s["key"]),
                protocol=str(s.get("protocol", "")),
                vip=str(s.get("vip")),
                port=int(s.get("port", 0)),
                replicas=tuple(reps),
            )
        )
    return out


def _scrape_one(netns: str) -> lab_table.Samples | None:
    try:
        status, body = nsio.request(
            netns,
            "127.0.0.1",
            SIDECAR_ADMIN_PORT,
            "GET",
            "/stats/prometheus",
            timeout=SCRAPE_TIMEOUT_S,
        )
    except OSError:
        return None
    if status != 200:
        return None
    try:
        return lab_table.parse(body.decode(errors="replace"))
    except ValueError:
        return None


def scrape(lab: Lab, pool: concurrent.futures.Executor) -> lab_table.Scrape:
    reps = lab.state().replicas()
    started = time.monotonic()
    results = list(pool.map(lambda r: _scrape_one(str(r["netns"])), reps))
    return lab_table.Scrape(
        at=started, by_sidecar={str(r["name"]): res for r, res in zip(reps, results, strict=True)}
    )


def client_view(lab: Lab) -> dict[str, Any] | None:
    state = lab.state()
    clients = {str(s["key"]): s for s in state.services if s.get("client")}
    for r in state.replicas():
        svc = clients.get(str(r["service"]))
        if svc is None:
            continue
        try:
            status, body = nsio.request(
                str(r["netns"]), "127.0.0.1", int(svc["port"]), "GET", "/stats", timeout=3
            )
            if status == 200:
                answer = json.loads(body)
                answer["replica"] = r["name"]
                return dict(answer)
        except (OSError, ValueError):
            return None
    return None


def caption(view: dict[str, Any] | None) -> str:
    if view is None:
        return ""
    parts = []
    for name, t in view.get("targets", {}).items():
        p50 = t.get("p50_ms")
        lat = f", p50 {p50:.1f} ms" if isinstance(p50, int | float) else ""
        parts.append(f"{name} {t.get('ok', 0)} ok / {t.get('failed', 0)} failed{lat}")
    return f"as the client {view.get('replica')} saw it since it started: " + " · ".join(parts)


def snapshot(
    lab: Lab, before: lab_table.Scrape, after: lab_table.Scrape, *, client: bool = True
) -> Table:
    rows = lab_table.rows(views(lab), before, after)
    title = (
        f"meshlet lab {lab.layout().prefix} · {time.strftime('%H:%M:%S')} · "
        f"rates over the last {after.at - before.at:.1f}s"
    )
    return lab_table.table(rows, title=title, caption=caption(client_view(lab)) if client else "")


def top(
    lab: Lab,
    console: Console,
    *,
    once: bool,
    interval: float = 2.0,
    window: float = 10.0,
    seconds: float = 0.0,
) -> None:
    lab.settings()  # a clear error when there is no lab
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = scrape(lab, pool)
        if once:
            time.sleep(interval)
            console.print(snapshot(lab, first, scrape(lab, pool)))
            return
        history: collections.deque[lab_table.Scrape] = collections.deque([first])
        deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
        try:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while time.monotonic() < deadline:
                    time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
                    now = scrape(lab, pool)
                    history.append(now)
                    while len(history) > 2 and now.at - history[1].at >= window:
                        history.popleft()
                    live.update(snapshot(lab, history[0], now), refresh=True)
        except KeyboardInterrupt:
            pass
        if not console.is_terminal:
            console.line()  # a live view ends its last line only on a terminal
