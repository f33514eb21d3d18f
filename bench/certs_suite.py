"""PKI costs that sit on hot paths: signing a workload certificate (the control plane,
at every renewal of every sidecar) and verifying a peer chain (a sidecar, per handshake)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from bench.stats import rate
from certs import pki
from certs.spiffe import SpiffeId
from certs.verify import Expectation, check_identity, verify_svid


def run(quick: bool) -> list[dict[str, Any]]:
    seconds = 0.5 if quick else 2.0
    now = dt.datetime.now(dt.UTC)
    root_key, issuer_key = pki.new_key(), pki.new_key()
    root = pki.build_root(root_key, trust_domain="bench.local", now=now)
    issuer = pki.build_issuer(issuer_key, root=root, root_key=root_key, now=now)
    sid = SpiffeId.for_workload("bench.local", "shop", "orders")
    leaf_key = pki.new_key()

    def sign() -> object:
        return pki.build_leaf(
            leaf_key.public_key(), spiffe_id=sid, issuer=issuer, issuer_key=issuer_key, now=now
        )

    leaf = pki.build_leaf(
        leaf_key.public_key(), spiffe_id=sid, issuer=issuer, issuer_key=issuer_key, now=now
    ).cert
    expect = Expectation.exactly(sid)
    return [
        {"suite": "certs", "name": "sign_leaf", **rate(sign, seconds=seconds)},
        {
            "suite": "certs",
            "name": "verify_chain",
            **rate(
                lambda: verify_svid([leaf, issuer], [root], now=now, expect=expect), seconds=seconds
            ),
        },
        {
            "suite": "certs",
            "name": "check_identity",
            **rate(lambda: check_identity(leaf, expect), seconds=seconds),
        },
    ]
