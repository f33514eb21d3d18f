"""The control plane's certificate authority: the CA directory, its own SVID, and signing.

``Authority`` owns DATA_DIR/ca (the directory ``meshlet certs`` works on), DATA_DIR/tls
(the control plane's own SVID, see ``ca_identity``) and DATA_DIR/join-token. It
notices a rotation in DATA_DIR/ca (``poll`` every few seconds, or ``reload`` when told),
signs with the current issuer from then on, and tells its subscribers (the discovery
server) so the new bundle reaches every client. The rules (who may get which ID, what a
CSR may ask for) live in ``ca_rules``; this module does the files and the bookkeeping.

It never hands out a private key, never signs without a checked credential, and never
blocks on the network. Call it from the event loop's thread; ``tls`` may be read from any
thread (gRPC's certificate fetcher runs on its own).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from certs import cadir, pki
from certs.bundle import bundle_fingerprint
from certs.files import SECRET, read_file, write_files
from control_plane import ca_rules as rules
from control_plane.ca_identity import ServerIdentity, TlsMaterial
from control_plane.ca_report import (
    CLIENT_RETENTION,
    ClientBook,
    ClientStatus,
    ca_report,
    known_roots,
    root_of,
    with_chain_facts,
)
from meshlet.errors import ConflictError, InputError, MeshError
from meshlet.runtime import Clock, Runtime

log = logging.getLogger(__name__)

CA_DIR = "ca"
TLS_DIR = "tls"
JOIN_TOKEN = "join-token"
POLL_INTERVAL_S = 2.0
ISSUED_MEMORY = 65_536  # serials whose root we remember (for clients that send no chain)
Signature = tuple[tuple[str, int, int, int], ...]  # (name, mtime_ns, size, inode) per file


@dataclass(frozen=True, slots=True)
class CaChange:
    """What a reload changed. True when anything did."""

    issuer: bool = False
    bundle: bool = False

    def __bool__(self) -> bool:
        return self.issuer or self.bundle


@dataclass(frozen=True, slots=True)
class Issued:
    chain: tuple[x509.Certificate, ...]  # leaf, then the issuer
    bundle_pem: bytes
    capped: bool  # the issuer's expiry shortened the lifetime

    @property
    def chain_pem(self) -> bytes:
        return pki.dump_certs(self.chain)


class Authority:
    """The CA of one control plane. ``start()`` before anything else."""

    def __init__(
        self,
        data_dir: Path,
        *,
        trust_domain: str,
        clock: Clock,
        rng: random.Random,
        join_token: str | None = None,
        default_ttl: dt.timedelta = rules.DEFAULT_TTL,
        max_ttl: dt.timedelta = rules.MAX_TTL,
        client_retention: dt.timedelta = CLIENT_RETENTION,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.ca_dir = self.data_dir / CA_DIR
        self.tls_dir = self.data_dir / TLS_DIR
        self.join_token_path = self.data_dir / JOIN_TOKEN
        self._configured_td = trust_domain
        self._fixed_token = join_token  # None: DATA_DIR/join-token, re-read on reload
        self._clock = clock
        self._rng = rng
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._state: cadir.CaState | None = None
        self._signature: Signature = ()
        self._token = ""
        self._bundle_fp = ""
        self._identity = ServerIdentity(self.tls_dir, clock=clock, rng=rng, ttl=default_ttl)
        self._issued: dict[str, str] = {}  # leaf serial (hex) → root fingerprint
        self._clients = ClientBook(retention=client_retention)
        self._subscribers: list[Callable[[CaChange], None]] = []

    # ---- lifecycle -----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        trust_domain: str,
        join_token: str | None = None,
        runtime: Runtime | None = None,
    ) -> Authority:
        """Construct and ``start()`` an Authority (the process's real clock unless given)."""
        runtime = runtime or Runtime.system()
        authority = cls(
            data_dir,
            trust_domain=trust_domain,
            clock=runtime.clock,
            rng=runtime.rng,
            join_token=join_token,
        )
        authority.start()
        return authority

    def start(self) -> None:
        """Load DATA_DIR/ca (or create it), the join token, and the control plane's SVID."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        signature = self._files_signature()
        if any((self.ca_dir / n).exists() for n in (cadir.ROOT_CERT, cadir.CA_CERT, cadir.CA_KEY)):
            state = cadir.load(self.ca_dir)
        else:
            state = cadir.init(self.ca_dir, self._configured_td, self._clock.now())
            log.info(
                "created CA", extra={"dir": str(self.ca_dir), "trust_domain": state.trust_domain}
            )
            signature = self._files_signature()
        self._adopt(state, signature, self._load_or_create_token())
        self._identity.load_or_issue(state)

    async def run(self, interval_s: float = POLL_INTERVAL_S) -> None:
        """Poll for rotations and renew the control plane's SVID, until cancelled."""
        while True:
            self.poll()
            await asyncio.sleep(interval_s)

    # ---- views -----------------------------------------------------------------------------

    @property
    def state(self) -> cadir.CaState:
        if self._state is None:
            raise MeshError("the certificate authority was not started: call start() first")
        return self._state

    @property
    def trust_domain(self) -> str:
        return self.state.trust_domain

    @property
    def bundle_pem(self) -> bytes:
        return pki.dump_certs(self.state.bundle)

    @property
    def bundle_fingerprint(self) -> str:
        return self._bundle_fp

    @property
    def tls(self) -> TlsMaterial:
        """The control plane's SVID (chain + key) and the bundle, for the gRPC server."""
        return self._identity.tls

    @property
    def server_chain(self) -> tuple[x509.Certificate, ...]:
        return self._identity.chain

    def subscribe(self, callback: Callable[[CaChange], None]) -> Callable[[], None]:
        """Call ``callback`` after every reload that changed something; returns unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # ---- rotation --------------------------------------------------------------------------

    def poll(self) -> bool:
        """Cheap periodic check: reload when DATA_DIR/ca changed; renew our SVID when due.

        Returns whether the issuer or the bundle changed. A half-written rotation (files
        renamed one by one) fails to load: it is logged and retried on the next poll, and
        the old CA keeps signing meanwhile.
        """
        change = False
        if self._files_signature() != self._signature:
            try:
                change = self.reload()
            except MeshError as e:
                log.warning("CA directory changed but cannot be loaded yet: %s", e)
        if self._identity.due():
            log.info("renewing the control plane's certificate")
            self._identity.issue(self.state)
        self._clients.prune(self._clock.now())
        return change

    def reload(self) -> bool:
        """Re-read DATA_DIR/ca and the join token; whether the issuer or the bundle changed.

        Raises (and keeps the old CA) when the directory cannot be loaded. Subscribers are
        told what changed (a ``CaChange``).
        """
        signature = self._files_signature()
        state = cadir.load(self.ca_dir)
        token = self._read_token()
        old = self.state
        change = CaChange(
            issuer=pki.fingerprint(state.issuer) != pki.fingerprint(old.issuer),
            bundle=bundle_fingerprint(state.bundle) != self._bundle_fp,
        )
        self._adopt(state, signature, token)
        if change or self._identity.problem(state):  # new issuer, or a new bundle for tls/
            self._identity.issue(state)
        if change:
            log.info(
                "CA reloaded",
                extra={"issuer_changed": change.issuer, "bundle_changed": change.bundle},
            )
            for callback in list(self._subscribers):
                callback(change)
        return bool(change)

    # ---- signing ---------------------------------------------------------------------------

    @property
    def join_token(self) -> str:
        return self._token

    def authenticate(
        self, *, join_token: str = "", peer_chain: Sequence[x509.Certificate] = ()
    ) -> None:
        """Raise AuthenticationError unless the caller holds the join token or a current SVID."""
        state = self.state
        rules.authenticate(
            join_token=join_token,
            expected_token=self._token,
            peer_chain=peer_chain,
            roots=state.bundle,
            trust_domain=state.trust_domain,
            now=self._clock.now(),
        )

    def sign(
        self,
        *,
        csr_pem: bytes,
        spiffe_id: str,
        join_token: str = "",
        ttl_seconds: int = 0,
        peer_chain: Sequence[x509.Certificate] = (),
    ) -> Issued:
        """Sign ``csr_pem`` for ``spiffe_id`` if the credential allows it.

        Raises AuthenticationError, PermissionDeniedError or InputError (see ``ca_rules``).
        """
        state = self.state
        now = self._clock.now()
        credentials = rules.authenticate(
            join_token=join_token,
            expected_token=self._token,
            peer_chain=peer_chain,
            roots=state.bundle,
            trust_domain=state.trust_domain,
            now=now,
        )
        requested = rules.parse_requested_id(spiffe_id)
        rules.authorize(credentials, requested, state.trust_domain)
        ttl = rules.leaf_ttl(ttl_seconds, default=self._default_ttl, maximum=self._max_ttl)
        csr = rules.check_csr(csr_pem, requested)
        leaf = pki.build_leaf(
            csr.public_key(),  # type: ignore[arg-type]  # check_csr made sure it is P-256
            spiffe_id=requested,
            issuer=state.issuer,
            issuer_key=state.issuer_key,
            now=now,
            ttl=ttl,
        )
        chain = (leaf.cert, state.issuer)
        self._remember(format(leaf.cert.serial_number, "x"), root_of(chain, state.bundle))
        return Issued(chain=chain, bundle_pem=self.bundle_pem, capped=leaf.capped)

    # ---- what clients run ------------------------------------------------------------------

    def record_client(self, status: ClientStatus, *, streams: int = 0) -> None:
        """Store what a client reports; ``streams`` is +1 when a Watch opens."""
        status = with_chain_facts(status)
        if status.leaf_chain:
            leaf_root: str | None = root_of(status.leaf_chain, known_roots(self.state))
        else:
            leaf_root = self._issued.get(status.leaf_serial) if status.leaf_serial else None
        self._clients.record(status, leaf_root=leaf_root, now=self._clock.now(), streams=streams)

    def touch_client(self, client_id: str) -> None:
        self._clients.touch(client_id, self._clock.now())

    def client_left(self, client_id: str) -> None:
        """A Watch stream of ``client_id`` ended."""
        self._clients.left(client_id, self._clock.now())

    def report(self) -> dict[str, Any]:
        """The body of ``GET /v1/ca``."""
        self._clients.prune(self._clock.now())
        return ca_report(
            self.state, bundle_fp=self._bundle_fp, clients=self._clients.records.values()
        )

    # ---- internals -------------------------------------------------------------------------

    def _adopt(self, state: cadir.CaState, signature: Signature, token: str) -> None:
        if state.trust_domain != self._configured_td:
            raise ConflictError(
                f"the CA in {self.ca_dir} is for trust domain {state.trust_domain!r} but the "
                f"control plane is configured for {self._configured_td!r}: start it with "
                f"--trust-domain {state.trust_domain}, or point it at another data directory"
            )
        self._state = state
        self._signature = signature
        self._token = token
        self._bundle_fp = bundle_fingerprint(state.bundle)

    def _files_signature(self) -> Signature:
        entries = []
        for path in [*(self.ca_dir / n for n in cadir.ALL_FILES), self.join_token_path]:
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(entries)

    def _read_token(self) -> str:
        if self._fixed_token is not None:
            return self._fixed_token
        token = read_file(self.join_token_path, what="join token").decode(errors="replace").strip()
        if not token:
            raise InputError(
                f"join token file {self.join_token_path} is empty: put a token in it, or "
                "delete it to have a new one made on start"
            )
        return token

    def _load_or_create_token(self) -> str:
        if self._fixed_token is None and not self.join_token_path.exists():
            token = secrets.token_urlsafe(32)
            write_files(self.data_dir, {JOIN_TOKEN: (token.encode() + b"\n", SECRET)})
            log.info("created join token", extra={"path": str(self.join_token_path)})
        return self._read_token()

    def _remember(self, serial: str, root_fp: str) -> None:
        self._issued[serial] = root_fp
        while len(self._issued) > ISSUED_MEMORY:
            del self._issued[next(iter(self._issued))]
