"""Who may call this service: the service policy's ``allowed_callers`` applied to a
verified peer identity. Pure.

Entries are SPIFFE IDs, ``NS/NAME`` (that service's identity in our trust domain) or
``NS/*`` (any service of that namespace). No list (None) allows any identity of the
trust domain — the chain and trust domain were already checked by then.
"""

from __future__ import annotations

from collections.abc import Sequence

from certs.spiffe import SpiffeId


def caller_allowed(caller: SpiffeId, allowed: Sequence[str] | None, trust_domain: str) -> bool:
    if caller.trust_domain != trust_domain:
        return False
    if allowed is None:
        return True
    workload = caller.workload()
    for entry in allowed:
        if entry.startswith("spiffe://"):
            if entry == str(caller):
                return True
            continue
        ns, _, name = entry.partition("/")
        if workload is not None and workload[0] == ns and name in ("*", workload[1]):
            return True
    return False
