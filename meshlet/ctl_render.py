"""How the CLI shows admin-API data: table rows per kind, `describe service`, tables.

Works on the API's JSON (plain dicts), so `meshlet get` never imports pydantic. Tables
are rich tables on a terminal and plain, kubectl-style aligned columns otherwise
(stable for scripts and tests: no colour, no box, no wrapping). Pure formatting: the
only output is ``print_table``'s write to the stream it is given.
"""

from __future__ import annotations

import dataclasses
import typing
from collections import Counter
from collections.abc import Sequence
from typing import Any, TextIO

from meshlet.policy import Policy

Row = Sequence[str]

SERVICE_COLUMNS = ("NAMESPACE", "NAME", "VIP", "PORTS", "ENDPOINTS")
ENDPOINT_COLUMNS = ("ID", "SERVICE", "ADDRESS", "APP-PORT", "NODE", "HEALTH", "LABELS")
NODE_COLUMNS = ("NAME", "UNDERLAY", "SUBNET", "VTEP-MAC", "HEALTH")
VIP_COLUMNS = ("VIP", "SERVICE", "PORTS")
DESCRIBE_ENDPOINT_COLUMNS = ("ID", "ADDRESS", "APP-PORT", "NODE", "HEALTH", "LABELS", "HEARTBEAT")


def ports_text(ports: list[dict[str, Any]]) -> str:
    return ",".join(f"{p['port']}/{p.get('protocol', 'auto')}" for p in ports) or "-"


def labels_text(labels: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "-"


def address_text(ep: dict[str, Any]) -> str:
    host = ep["address"]
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{ep.get('inbound_port', 15006)}"


def value_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ", ".join(value_text(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return labels_text(value) if value else "(any)"
    return str(value)


# ---- rows ------------------------------------------------------------------------------------


def service_rows(services: list[dict[str, Any]], endpoints: list[dict[str, Any]]) -> list[Row]:
    total: Counter[str] = Counter()
    healthy: Counter[str] = Counter()
    for ep in endpoints:
        key = f"{ep['namespace']}/{ep['service']}"
        total[key] += 1
        healthy[key] += ep.get("health") == "healthy"
    rows: list[Row] = []
    for s in services:
        key = f"{s['namespace']}/{s['name']}"
        rows.append(
            (
                s["namespace"],
                s["name"],
                s.get("vip") or "-",
                ports_text(s["ports"]),
                f"{healthy[key]}/{total[key]}",
            )
        )
    return rows


def endpoint_rows(endpoints: list[dict[str, Any]]) -> list[Row]:
    return [
        (
            ep["id"],
            f"{ep['namespace']}/{ep['service']}",
            address_text(ep),
            str(ep["app_port"]),
            ep.get("node") or "-",
            ep.get("health", "-"),
            labels_text(ep.get("labels")),
        )
        for ep in endpoints
    ]


def node_rows(nodes: list[dict[str, Any]]) -> list[Row]:
    return [
        (n["name"], n["underlay_address"], n.get("subnet") or "-", n["vtep_mac"], n["health"])
        for n in nodes
    ]


def vip_rows(vips: list[dict[str, Any]]) -> list[Row]:
    return [(v.get("vip") or "-", v["service"], ports_text(v["ports"])) for v in vips]


def heartbeat_text(age: float | None) -> str:
    return "-" if age is None else f"{age:.0f}s ago"


# ---- tables ----------------------------------------------------------------------------------


def plain_table(columns: Row, rows: Sequence[Row]) -> str:
    """Aligned columns, three spaces apart, no trailing blanks (like kubectl)."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    lines = []
    for row in [columns, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def print_table(columns: Row, rows: Sequence[Row], out: TextIO) -> None:
    if not out.isatty():
        out.write(plain_table(columns, rows))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for name in columns:
        table.add_column(name, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(file=out)
    # Never fold a cell (an address cut in two misleads); let a narrow terminal wrap lines.
    natural = len(plain_table(columns, rows).split("\n", 1)[0]) + 3 * len(columns)
    console.width = max(console.width, natural)
    console.print(table)


# ---- describe --------------------------------------------------------------------------------


def _ordered(data: dict[str, Any], cls: type | None) -> dict[str, Any]:
    """``data``'s keys in the model's field order (the server sorts them alphabetically)."""
    if cls is None or not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    order = [f.name for f in dataclasses.fields(cls) if f.name in data]
    keys = order + sorted(k for k in data if k not in order)
    out = {}
    for key in keys:
        value = data[key]
        if isinstance(value, dict):
            hint = hints.get(key)
            is_model = isinstance(hint, type) and dataclasses.is_dataclass(hint)
            value = _ordered(value, hint if is_model else None)
        out[key] = value
    return out


def _is_tree(key: str, value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and key != "labels"


def _key_width(data: dict[str, Any], indent: int) -> int:
    widths = [indent + len(k) for k in data]
    for key, value in data.items():
        if _is_tree(key, value):
            widths.append(_key_width(value, indent + 2))
    return max(widths, default=0)


def _tree(data: dict[str, Any], indent: int, column: int) -> list[str]:
    lines = []
    for key, value in data.items():
        pad = " " * indent
        if _is_tree(key, value):
            lines.append(f"{pad}{key}")
            lines.extend(_tree(value, indent + 2, column))
        else:
            text = "none" if value is None else value_text(value)
            lines.append(f"{pad}{key.ljust(column - indent)}{text}")
    return lines


def _match_text(match: dict[str, Any]) -> str:
    parts = []
    for key in ("path_prefix", "path_exact"):
        if match.get(key) is not None:
            parts.append(f"{key}={match[key]}")
    if match.get("methods"):
        parts.append("methods=" + ",".join(match["methods"]))
    for h in match.get("headers") or []:
        for how in ("exact", "prefix", "present"):
            if h.get(how) is not None:
                parts.append(f"header {h['name']} {how}={value_text(h[how])}")
    return " ".join(parts) or "every request"


def _backends_text(backends: list[dict[str, Any]]) -> str:
    if not backends:
        return "every endpoint of the service"
    total = sum(b.get("weight", 1) for b in backends)
    shares = []
    for b in backends:
        weight = b.get("weight", 1)
        percent = 100 * weight / total if total else 0
        who = labels_text(b["labels"]) if b.get("labels") else "any endpoint"
        shares.append(f"{who} {percent:.4g}% (weight {weight})")
    return ", ".join(shares)


def route_lines(routes: list[dict[str, Any]], indent: int, column: int) -> list[str]:
    pad = " " * indent
    if not routes:
        return [
            f"{pad}{'routes'.ljust(column - indent)}(none: every endpoint serves every request)"
        ]
    lines = [f"{pad}routes (in order)"]
    inner = indent + 5
    for i, r in enumerate(routes, start=1):
        lines.append(f"{pad}  {i}. {r['name']}")
        for key, text in (
            ("match", _match_text(r.get("match") or {})),
            ("backends", _backends_text(r.get("backends") or [])),
            ("timeout_s", value_text(r.get("timeout_s") or "none")),
        ):
            lines.append(f"{' ' * inner}{key.ljust(column - inner)}{text}")
    return lines


def describe_service(service: dict[str, Any], endpoints: list[dict[str, Any]]) -> str:
    """The readable report of `meshlet describe service`."""
    policy = _ordered(service.get("policy") or {}, Policy)
    healthy = sum(1 for ep in endpoints if ep.get("health") == "healthy")
    lines = [
        f"{'Service:'.ljust(12)}{service['namespace']}/{service['name']}",
        f"{'VIP:'.ljust(12)}{service.get('vip') or '-'}",
        f"{'Ports:'.ljust(12)}{ports_text(service['ports']).replace(',', ', ')}",
        f"{'Endpoints:'.ljust(12)}{healthy} healthy of {len(endpoints)}",
        "",
        "Policy (effective, defaults included):",
    ]
    sections = {k: v for k, v in policy.items() if _is_tree(k, v)}
    column = max(_key_width(sections, 4), 2 + len("allowed_callers"), 14) + 3
    for section, data in sections.items():
        lines.append(f"  {section}")
        lines.extend(_tree(data, 4, column))
    lines.extend(route_lines(policy.get("routes") or [], 2, column))
    callers = policy.get("allowed_callers")
    who = "any identity in the trust domain" if callers is None else value_text(callers)
    lines.append(f"  {'allowed_callers'.ljust(column - 2)}{who}")
    lines.append("")
    if not endpoints:
        lines.append("Endpoints:  (none registered)")
        return "\n".join(lines) + "\n"
    lines.append("Endpoints:")
    rows = [
        (
            ep["id"],
            address_text(ep),
            str(ep["app_port"]),
            ep.get("node") or "-",
            ep.get("health", "-"),
            labels_text(ep.get("labels")),
            heartbeat_text(ep.get("last_heartbeat_age_s")),
        )
        for ep in endpoints
    ]
    table = plain_table(DESCRIBE_ENDPOINT_COLUMNS, rows)
    lines.extend("  " + line for line in table.rstrip("\n").split("\n"))
    return "\n".join(lines) + "\n"
