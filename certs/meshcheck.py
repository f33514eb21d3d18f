"""Is the running mesh ready for the next root-rotation step? Pure: reads the control
plane's /v1/ca report (a dict), returns the reasons to wait.

Before promote, every client must trust the bundle that holds both roots; before
retire, every client's leaf must chain to the new root. A client the control plane
cannot vouch for (no report yet) blocks too: an unknown is not a yes.
"""

from __future__ import annotations

from typing import Any

from certs.cadir import Step


def blockers(report: dict[str, Any], step: Step) -> list[str]:
    """Why ``step`` is not yet safe for the mesh the report describes (empty: safe)."""
    reasons: list[str] = []
    for client in report.get("clients", []):
        who = f"{client.get('kind') or 'client'} {client.get('client_id')}"
        if client.get("spiffe_id"):
            who += f" ({client['spiffe_id']})"
        if step is Step.PROMOTE and not client.get("bundle_current"):
            fp = (client.get("bundle_fingerprint") or "none")[:16]
            reasons.append(f"{who} still trusts bundle {fp}, not the current one with both roots")
        elif step is Step.RETIRE and client.get("leaf_under_current_root") is not True:
            state = "unknown" if client.get("leaf_under_current_root") is None else "the old root"
            reasons.append(f"{who} runs leaf {client.get('leaf_serial') or '?'} under {state}")
    return reasons
