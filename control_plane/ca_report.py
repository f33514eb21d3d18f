"""What the mesh's clients run, for ``GET /v1/ca``: pure bookkeeping and the report.

Each sidecar, node helper or CLI says (in its WatchRequest, or a Report) which SPIFFE ID,
trust bundle and leaf it runs. ``ClientBook`` keeps the latest word per client; ``ca_report``
turns it and the CA state into the body `meshlet certs rotate root --status` reads to say
when the next rotation step is safe. Pure: ``now`` is handed in; no files, no sockets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from certs import pki
from certs.cadir import CaState
from meshlet.errors import InputError

CLIENT_KINDS = ("sidecar", "node", "cli")
CLIENT_RETENTION = dt.timedelta(hours=1)  # forget a disconnected client after this long
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_client(client_id: str, kind: str) -> None:
    if not _CLIENT_ID.fullmatch(client_id):
        raise InputError(
            f"client_id {client_id!r} must be 1-128 letters, digits, '.', '_', ':', '-'"
        )
    if kind not in CLIENT_KINDS:
        raise InputError(f"kind {kind!r} must be one of {', '.join(CLIENT_KINDS)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientStatus:
    """What a client says it runs (WatchRequest / Report)."""

    client_id: str
    kind: str
    spiffe_id: str = ""
    bundle_fingerprint: str = ""
    leaf_serial: str = ""  # lowercase hex
    leaf_not_after: dt.datetime | None = None
    leaf_chain: tuple[x509.Certificate, ...] = ()  # when sent: serial/expiry come from it


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRecord:
    status: ClientStatus
    leaf_root: str | None  # fingerprint of the root the leaf chains to; None when unknown
    last_seen: dt.datetime
    streams: int = 0  # open Watch streams


def with_chain_facts(status: ClientStatus) -> ClientStatus:
    """Serial and expiry read from the leaf chain, when the client sent one."""
    if not status.leaf_chain:
        return status
    leaf = status.leaf_chain[0]
    sid = pki.spiffe_id_of(leaf)
    return ClientStatus(
        client_id=status.client_id,
        kind=status.kind,
        spiffe_id=str(sid) if sid else status.spiffe_id,
        bundle_fingerprint=status.bundle_fingerprint,
        leaf_serial=format(leaf.serial_number, "x"),
        leaf_not_after=leaf.not_valid_after_utc,
        leaf_chain=status.leaf_chain,
    )


def root_of(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> str:
    """Fingerprint of the root among ``roots`` that ``chain`` leads to ("" when none)."""
    anchor = pki.anchor_of(chain, roots)
    return pki.fingerprint(anchor) if anchor is not None else ""


def known_roots(state: CaState) -> list[x509.Certificate]:
    extra = [c for c in (state.next_root, state.previous_root) if c is not None]
    return [*state.bundle, *(c for c in extra if c not in state.bundle)]


def _ts(t: dt.datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _role(state: CaState, cert: x509.Certificate) -> str:
    if cert == state.root:
        return "active"
    if cert == state.next_root:
        return "next"
    if cert == state.previous_root:
        return "previous"
    return "trusted"


@dataclass(slots=True)
class ClientBook:
    """The latest report of every client, and how many Watch streams it has open."""

    retention: dt.timedelta = CLIENT_RETENTION
    records: dict[str, ClientRecord] = field(default_factory=dict)

    def record(
        self, status: ClientStatus, *, leaf_root: str | None, now: dt.datetime, streams: int = 0
    ) -> None:
        """Store a report; ``streams`` is +1 when it came with a new Watch."""
        old = self.records.get(status.client_id)
        self.records[status.client_id] = ClientRecord(
            status=status,
            leaf_root=leaf_root,
            last_seen=now,
            streams=(old.streams if old else 0) + streams,
        )

    def touch(self, client_id: str, now: dt.datetime) -> None:
        if (record := self.records.get(client_id)) is not None:
            self.records[client_id] = dataclasses.replace(record, last_seen=now)

    def left(self, client_id: str, now: dt.datetime) -> None:
        """One Watch stream of ``client_id`` ended."""
        if (record := self.records.get(client_id)) is not None:
            streams = max(0, record.streams - 1)
            self.records[client_id] = dataclasses.replace(record, streams=streams, last_seen=now)

    def prune(self, now: dt.datetime) -> None:
        """Forget clients with no open stream that were last seen before the retention."""
        cutoff = now - self.retention
        for client_id, record in list(self.records.items()):
            if record.streams == 0 and record.last_seen < cutoff:
                del self.records[client_id]


def client_row(record: ClientRecord, *, bundle_fp: str, active_root_fp: str) -> dict[str, Any]:
    s = record.status
    return {
        "client_id": s.client_id,
        "kind": s.kind,
        "spiffe_id": s.spiffe_id or None,
        "bundle_fingerprint": s.bundle_fingerprint or None,
        "bundle_current": s.bundle_fingerprint == bundle_fp,
        "leaf_serial": s.leaf_serial or None,
        "leaf_not_after": _ts(s.leaf_not_after),
        "leaf_under_current_root": (
            None if record.leaf_root is None else record.leaf_root == active_root_fp
        ),
        "last_seen": _ts(record.last_seen),
        "connected": record.streams > 0,
    }


def ca_report(state: CaState, *, bundle_fp: str, clients: Iterable[ClientRecord]) -> dict[str, Any]:
    """The body of ``GET /v1/ca``: the bundle's roots, the issuer, and every client's view."""
    active = pki.fingerprint(state.root)
    return {
        "trust_domain": state.trust_domain,
        "roots": [
            {
                "fingerprint": pki.fingerprint(c),
                "not_after": _ts(c.not_valid_after_utc),
                "role": _role(state, c),
            }
            for c in state.bundle
        ],
        "issuer": {
            "fingerprint": pki.fingerprint(state.issuer),
            "serial": format(state.issuer.serial_number, "x"),
            "not_after": _ts(state.issuer.not_valid_after_utc),
            "root": root_of(state.chain, known_roots(state)) or None,
        },
        "bundle_fingerprint": bundle_fp,
        "next_step": state.next_step.value,
        "clients": [
            client_row(r, bundle_fp=bundle_fp, active_root_fp=active)
            for r in sorted(clients, key=lambda r: r.status.client_id)
        ],
    }
