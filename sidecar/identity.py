"""The sidecar's workload identity: its key, its X.509-SVID, the trust bundle, and the pair
of TLS contexts built from them.

The key (ECDSA P-256) is made here, kept 0600 in a 0700 directory and reused across
restarts and renewals; only a CSR ever leaves the process. The first certificate is a
valid cert.pem already in the directory or one signed with the join token over TLS;
renewals go to the control plane's mTLS port, presenting the current SVID, at 2/3 of the
lifetime with jitter (``certs.schedule``), falling back to the join token if they fail.
A new leaf or a pushed trust bundle builds one new set of SSLContexts: connections
opened from then on use it, open connections keep the one they started with.

ALPN between sidecars says what a connection carries: the server context offers
``MESH_ALPN``; ``client`` offers nothing (the L4 relay, which the inbound side relays
byte for byte), and ``client_alpn[p]`` offers ``p`` alone (an L7 leg, parsed on the
inbound side). A client offering none of the server's protocols gets no ALPN: L4.

This module never sends the key anywhere, never builds a context per connection, never
writes a file in place (``certs.files.write_files``), and ``run()`` never raises: a
failure is logged and retried with backoff while the current certificate keeps serving.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs import pki, schedule
from certs.bundle import bundle_fingerprint
from certs.files import PUBLIC, SECRET, ensure_private_dir, read_file, write_files
from certs.spiffe import SpiffeId
from certs.verify import Expectation, verify_svid
from meshlet import discovery_client as dc
from meshlet.errors import CertificateError, InputError, MeshError
from meshlet.runtime import Clock
from sidecar import tls

log = logging.getLogger(__name__)

KEY, CERT, BUNDLE = "key.pem", "cert.pem", "bundle.pem"
MAX_SLEEP_S = 30.0  # re-read the wall clock at least this often (host suspend, clock steps)
RETRY_CAP_S = 60.0
ALPN_HTTP1 = "http/1.1"
ALPN_H2 = "h2"
# The application protocols the mTLS leg between sidecars may carry (besides none: L4).
MESH_ALPN: tuple[str, ...] = (ALPN_HTTP1, ALPN_H2)


@dataclass(frozen=True, slots=True)
class Contexts:
    """The TLS contexts for new connections, and what they hold."""

    server: ssl.SSLContext  # offers MESH_ALPN
    client: ssl.SSLContext  # offers no ALPN: the L4 relay
    serial: str  # the leaf's serial, lowercase hex
    not_after: dt.datetime
    bundle_fingerprint: str
    client_alpn: Mapping[str, ssl.SSLContext] = field(default_factory=dict)  # one per protocol


Listener = Callable[[Contexts], None]


@dataclass(frozen=True, slots=True)
class _Current:
    chain: tuple[x509.Certificate, ...]
    chain_pem: bytes
    bundle: tuple[x509.Certificate, ...]
    bundle_pem: bytes
    contexts: Contexts
    renew_at: dt.datetime  # drawn once per leaf


class Identity:
    """One workload's SVID in ``cert_dir``: ``await ensure()``, then ``run()`` in a TaskGroup."""

    def __init__(
        self,
        cert_dir: Path,
        spiffe_id: SpiffeId,
        *,
        control_plane: str,
        control_plane_mtls: str | None,
        bundle_pem: bytes,
        join_token: str | None,
        ttl_s: int | None = None,
        clock: Clock,
        rng: random.Random,
        alpn: Sequence[str] = MESH_ALPN,
    ) -> None:
        self.cert_dir = Path(cert_dir)
        self._sid = spiffe_id
        self._control_plane = control_plane
        self._control_plane_mtls = control_plane_mtls
        self._given_bundle_pem = bundle_pem
        self._join_token = join_token or None
        self._ttl_s = ttl_s or 0
        self._clock = clock
        self._rng = rng
        self._alpn = tuple(alpn)
        self._key_pem = b""
        self._key: pki.PrivateKey | None = None
        self._csr_pem = b""
        self._current: _Current | None = None
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()
        self.generation = 0  # +1 on every new leaf or bundle
        self.renewals = 0
        self.renewal_failures = 0
        self.last_renewal_via = ""  # "mtls" or "join-token"

    # ---- views ----------------------------------------------------------------------------

    @property
    def spiffe_id(self) -> SpiffeId:
        return self._sid

    def _cur(self) -> _Current:
        if self._current is None:
            raise MeshError(f"no certificate for {self._sid} yet: ensure() has not succeeded")
        return self._current

    @property
    def contexts(self) -> Contexts:
        return self._cur().contexts

    @property
    def leaf_chain_pem(self) -> bytes:
        return self._cur().chain_pem

    @property
    def bundle_pem(self) -> bytes:
        return self._cur().bundle_pem

    @property
    def renew_at(self) -> dt.datetime:
        return self._cur().renew_at

    def expiry_seconds(self, now: dt.datetime) -> float:
        """Seconds until the current leaf expires (negative once it has)."""
        return (self._cur().contexts.not_after - now).total_seconds()

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(contexts)`` after every new leaf or bundle; returns unsubscribe."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    def channel(self, address: str) -> grpc.aio.Channel:
        """An mTLS channel to the control plane presenting the current SVID (call in the loop)."""
        cur = self._cur()
        return dc.channel(address, cur.bundle_pem, cur.chain_pem, self._key_pem)

    def request_renewal(self) -> None:
        """Have ``run()`` renew now instead of at the scheduled time."""
        self._wake.set()

    # ---- first certificate ------------------------------------------------------------------

    async def ensure(self) -> Contexts:
        """A usable SVID: the one in ``cert_dir`` if valid and not due, else a signed one.

        InputError when there is no usable certificate and no join token; other MeshErrors
        (the control plane unreachable or refusing) may go away on a retry.
        """
        ensure_private_dir(self.cert_dir)
        self._load_or_make_key()
        bundle = self._starting_bundle()
        now = self._clock.now()
        chain, problem = self._read_cert(bundle, now)
        if chain is not None:
            write_files(self.cert_dir, {BUNDLE: (pki.dump_certs(bundle), PUBLIC)})
            self._adopt(chain, bundle)
            cur = self._cur()
            if now < cur.renew_at:
                log.info("using the certificate in %s", self.cert_dir, extra=self._facts())
                return cur.contexts
            try:
                await self._renew()
            except MeshError as e:
                log.warning(
                    "certificate is due but renewal failed; serving it meanwhile",
                    extra={**self._facts(), "error": str(e)},
                )
            return self.contexts
        if self._join_token is None:
            raise InputError(
                f"no usable certificate for {self._sid} in {self.cert_dir} ({problem}) and no "
                "join token: pass the control plane's join token (DATA_DIR/join-token), or put "
                f"a valid {CERT} for this ID with its {KEY} in {self.cert_dir}"
            )
        signed = await self._sign(self._control_plane, mtls=False, trust=bundle)
        self._install(signed, via="join-token", trust=bundle)
        return self.contexts

    def _load_or_make_key(self) -> None:
        path = self.cert_dir / KEY
        if path.exists():
            data = read_file(path, what="private key")
            try:
                key = pki.load_key(data, source=str(path))
            except CertificateError as e:
                raise InputError(
                    f"{e}: delete it to have a new key made (a join token then gets its certificate)"
                ) from None
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, SECRET)
                log.warning("tightened %s to mode 0600", path)
        else:
            key = pki.new_key()
            data = pki.dump_key(key)
            write_files(self.cert_dir, {KEY: (data, SECRET)})
            log.info("made a new private key", extra={"path": str(path)})
        self._key, self._key_pem = key, data
        csr = pki.build_csr(key, self._sid)
        self._csr_pem = csr.public_bytes(serialization.Encoding.PEM)

    def _starting_bundle(self) -> tuple[x509.Certificate, ...]:
        """The operator's bundle plus the last one the control plane pushed (until it pushes)."""
        try:
            given = pki.load_certs(self._given_bundle_pem, source="the --ca-bundle")
        except CertificateError as e:
            raise InputError(f"{e}: give the mesh's bundle.pem (DATA_DIR/ca/bundle.pem)") from None
        saved: list[x509.Certificate] = []
        if (path := self.cert_dir / BUNDLE).exists():
            try:
                saved = pki.load_certs(path.read_bytes(), source=str(path))
            except (OSError, MeshError) as e:
                log.warning("ignoring an unreadable %s: %s", path, e)
        return tuple(dict.fromkeys([*saved, *given]))  # in order, each root once

    def _read_cert(
        self, bundle: Sequence[x509.Certificate], now: dt.datetime
    ) -> tuple[tuple[x509.Certificate, ...] | None, str]:
        """The chain in cert.pem if it is a valid SVID for our ID and key; else why not."""
        path = self.cert_dir / CERT
        if not path.exists():
            return None, f"there is no {CERT}"
        try:
            chain = tuple(pki.load_certs(read_file(path, what="certificate"), source=str(path)))
        except MeshError as e:
            return None, str(e)
        problem = self._chain_problem(chain, bundle, now)
        return (None, problem) if problem else (chain, "")

    def _chain_problem(
        self, chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: dt.datetime
    ) -> str:
        assert self._key is not None
        if not chain or not pki.key_matches(chain[0], self._key):
            return f"the certificate does not belong to {self.cert_dir / KEY}"
        verdict = verify_svid(chain, roots, now=now, expect=Expectation.exactly(self._sid))
        return "" if verdict.ok else f"the certificate is not usable: {verdict}"

    # ---- renewal ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew at the scheduled time, for ever; never raises (cancel to stop)."""
        attempt = 0
        while True:
            try:
                if self._current is None:
                    await self.ensure()
                else:
                    await self._sleep_until_due()
                    await self._renew()
                attempt = 0
            except Exception as e:  # a failed renewal must never take the sidecar down
                attempt += 1
                self.renewal_failures += 1
                wait = self._retry_delay(attempt)
                log.warning(
                    "certificate renewal failed; retrying",
                    extra={**self._facts(), "error": str(e), "retry_in_s": round(wait, 2)},
                    exc_info=not isinstance(e, MeshError),
                )
                await self._sleep_or_wake(wait)

    def _retry_delay(self, attempt: int) -> float:
        cap = RETRY_CAP_S
        if self._current is not None:  # retry several times before the leaf runs out
            cap = min(cap, max(1.0, self.expiry_seconds(self._clock.now()) / 4))
        return schedule.retry_delay(attempt, self._rng, cap=cap)

    async def _sleep_until_due(self) -> None:
        while (left := (self.renew_at - self._clock.now()).total_seconds()) > 0:
            if await self._sleep_or_wake(min(left, MAX_SLEEP_S)):
                return

    async def _sleep_or_wake(self, seconds: float) -> bool:
        """Sleep ``seconds``; True (and at once) when ``request_renewal`` woke us."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            return False
        self._wake.clear()
        return True

    async def _renew(self) -> None:
        """Over mTLS with the current SVID while it is valid; else (or failing that) the token."""
        cur = self._cur()
        routes: list[tuple[str, str]] = []
        if self._control_plane_mtls and self.expiry_seconds(self._clock.now()) > 0:
            routes.append(("mtls", self._control_plane_mtls))
        if self._join_token is not None:
            routes.append(("join-token", self._control_plane))
        failures: list[str] = []
        for via, address in routes:
            try:
                signed = await self._sign(address, mtls=via == "mtls", trust=cur.bundle)
                self._install(signed, via=via, trust=cur.bundle)
                return
            except MeshError as e:
                failures.append(f"signing ({via}) at {address} failed: {e}")
                log.warning("%s", failures[-1], extra=self._facts())
        raise MeshError(
            "; ".join(failures)
            or "the certificate has expired and there is no join token to get a new one"
        )

    async def _sign(
        self, address: str, *, mtls: bool, trust: Sequence[x509.Certificate]
    ) -> dc.Signed:
        """One Sign call: our CSR, with the current SVID (mTLS) or with the join token."""
        svid = (self._cur().chain_pem, self._key_pem) if mtls else (None, None)
        async with dc.channel(address, pki.dump_certs(trust), *svid) as channel:
            return await dc.sign(
                dc.CertificateAuthorityStub(channel),  # type: ignore[no-untyped-call]
                csr_pem=self._csr_pem,
                spiffe_id=str(self._sid),
                join_token="" if mtls else (self._join_token or ""),
                ttl_seconds=self._ttl_s,
            )

    def _install(self, signed: dc.Signed, *, via: str, trust: Sequence[x509.Certificate]) -> None:
        """Check the control plane's answer, write it, and serve it."""
        source = "the control plane's certificate"
        chain = tuple(pki.load_certs(signed.cert_chain_pem, source=source))
        bundle = tuple(trust)
        if signed.trust_bundle_pem:
            bundle = tuple(pki.load_certs(signed.trust_bundle_pem, source="its trust bundle"))
        problem = self._chain_problem(chain, bundle, self._clock.now())
        if problem:
            raise CertificateError(f"{source} was refused: {problem}")
        files = {CERT: (pki.dump_certs(chain), PUBLIC), BUNDLE: (pki.dump_certs(bundle), PUBLIC)}
        write_files(self.cert_dir, files)
        if self._current is not None:
            self.renewals += 1
        self.last_renewal_via = via
        self._adopt(chain, bundle)
        log.info("certificate issued", extra={**self._facts(), "via": via})

    # ---- trust bundle -------------------------------------------------------------------------

    def set_bundle(self, bundle_pem: bytes) -> bool:
        """Adopt a trust bundle the control plane pushed; True when it changed anything.

        CertificateError (and nothing changes) when it holds no CA certificate. When our
        own leaf no longer chains to it (the old root was retired early), renew at once.
        """
        roots = tuple(pki.load_certs(bundle_pem, source="the pushed trust bundle"))
        if not roots or not all(pki.is_ca(c) for c in roots):
            raise CertificateError("the pushed trust bundle must hold only CA certificates")
        cur = self._cur()
        if bundle_fingerprint(roots) == cur.contexts.bundle_fingerprint:
            return False
        write_files(self.cert_dir, {BUNDLE: (pki.dump_certs(roots), PUBLIC)})
        self._adopt(cur.chain, roots)
        log.info("trust bundle adopted", extra={**self._facts(), "roots": len(roots)})
        if pki.anchor_of(cur.chain, roots) is None:
            log.warning("our certificate does not chain to the new trust bundle: renewing now")
            self.request_renewal()
        return True

    # ---- internals ------------------------------------------------------------------------------

    def _adopt(self, chain: Sequence[x509.Certificate], bundle: Sequence[x509.Certificate]) -> None:
        """Serve ``chain`` (already in cert.pem) with ``bundle``: one new pair of contexts."""
        leaf = chain[0]
        old = self._current
        bundle_pem = pki.dump_certs(bundle)
        cert_path, key_path = self.cert_dir / CERT, self.cert_dir / KEY
        try:
            server = tls.server_context(cert_path, key_path, bundle_pem, alpn=self._alpn)
            client = tls.client_context(cert_path, key_path, bundle_pem)
            client_alpn = {
                p: tls.client_context(cert_path, key_path, bundle_pem, alpn=(p,))
                for p in self._alpn
            }
        except (ssl.SSLError, ValueError) as e:
            raise CertificateError(f"cannot build TLS contexts from {cert_path}: {e}") from None
        contexts = Contexts(
            server=server,
            client=client,
            serial=format(leaf.serial_number, "x"),
            not_after=leaf.not_valid_after_utc,
            bundle_fingerprint=bundle_fingerprint(bundle),
            client_alpn=client_alpn,
        )
        if old is not None and old.chain[0] == leaf:
            renew_at = old.renew_at  # drawn once per leaf
        else:
            renew_at = schedule.renewal_time(
                leaf.not_valid_before_utc, leaf.not_valid_after_utc, self._rng
            )
        self._current = _Current(
            chain=tuple(chain),
            chain_pem=pki.dump_certs(chain),
            bundle=tuple(bundle),
            bundle_pem=bundle_pem,
            contexts=contexts,
            renew_at=renew_at,
        )
        self.generation += 1
        for callback in list(self._listeners):
            try:
                callback(contexts)
            except Exception:
                log.exception("an identity listener failed")

    def _facts(self) -> dict[str, object]:
        facts: dict[str, object] = {"spiffe_id": str(self._sid)}
        if (cur := self._current) is not None:
            facts.update(serial=cur.contexts.serial, not_after=str(cur.contexts.not_after))
            facts.update(renew_at=str(cur.renew_at), bundle=cur.contexts.bundle_fingerprint[:16])
        return facts
