"""The control plane's own SVID in DATA_DIR/tls: kept across restarts, re-issued when the
CA changes under it, renewed at 2/3 of its life (with jitter), and served by gRPC.

``spiffe://TD/ns/meshlet-system/sa/control-plane`` with the DNS name
``control-plane.meshlet`` that clients pin with ``grpc.ssl_target_name_override``. The key
is written 0600 in a 0700 directory and never leaves this process. ``tls`` is swapped as
one immutable value, so gRPC's fetcher thread may read it at any time.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from certs import cadir, pki, schedule
from certs.files import PUBLIC, SECRET, ensure_private_dir, read_file, write_files
from control_plane import ca_rules as rules
from meshlet.errors import MeshError
from meshlet.runtime import Clock

log = logging.getLogger(__name__)

TLS_CERT, TLS_KEY, TLS_BUNDLE = "cert.pem", "key.pem", "bundle.pem"


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """What the gRPC server serves; ``generation`` changes whenever any of it does."""

    generation: int
    cert_chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes


class ServerIdentity:
    def __init__(
        self, tls_dir: Path, *, clock: Clock, rng: random.Random, ttl: dt.timedelta
    ) -> None:
        self.tls_dir = tls_dir
        self._clock = clock
        self._rng = rng
        self._ttl = ttl
        self._tls: TlsMaterial | None = None
        self.chain: tuple[x509.Certificate, ...] = ()
        self._renew_at = dt.datetime.max.replace(tzinfo=dt.UTC)

    @property
    def tls(self) -> TlsMaterial:
        if self._tls is None:
            raise MeshError("the certificate authority was not started: call start() first")
        return self._tls

    def due(self) -> bool:
        return self._clock.now() >= self._renew_at

    def problem(self, state: cadir.CaState) -> str | None:
        """Why the current certificate cannot serve under ``state`` (None: it can)."""
        key = pki.load_key(self.tls.key_pem, source="control plane key")
        return rules.server_cert_problem(self.chain, key, state, self._clock.now())

    def load_or_issue(self, state: cadir.CaState) -> None:
        """Serve the certificate in DATA_DIR/tls if it is still good; else issue a new one."""
        cert, key = self.tls_dir / TLS_CERT, self.tls_dir / TLS_KEY
        if cert.exists() and key.exists():
            try:
                chain = tuple(pki.load_certs(read_file(cert, what="certificate"), source=str(cert)))
                key_pem = read_file(key, what="key")
                problem = rules.server_cert_problem(
                    chain, pki.load_key(key_pem, source=str(key)), state, self._clock.now()
                )
            except MeshError as e:
                problem = str(e)
            if problem is None:
                self._use(chain, key_pem, state)
                if not self.due():
                    return
                problem = "it is due for renewal"
            log.info("re-issuing the control plane's certificate: %s", problem)
        self.issue(state)

    def issue(self, state: cadir.CaState) -> None:
        """A new key and certificate from the current issuer, written and served."""
        chain, key = rules.build_server_cert(state, self._clock.now(), self._ttl)
        key_pem = pki.dump_key(key)
        ensure_private_dir(self.tls_dir)
        write_files(
            self.tls_dir,
            {
                TLS_KEY: (key_pem, SECRET),
                TLS_CERT: (pki.dump_certs(chain), PUBLIC),
                TLS_BUNDLE: (pki.dump_certs(state.bundle), PUBLIC),
            },
        )
        self._use(chain, key_pem, state)

    def _use(
        self, chain: tuple[x509.Certificate, ...], key_pem: bytes, state: cadir.CaState
    ) -> None:
        leaf = chain[0]
        self.chain = chain
        self._renew_at = schedule.renewal_time(
            leaf.not_valid_before_utc, leaf.not_valid_after_utc, self._rng
        )
        generation = self._tls.generation + 1 if self._tls else 1
        bundle_pem = pki.dump_certs(state.bundle)
        self._tls = TlsMaterial(generation, pki.dump_certs(chain), key_pem, bundle_pem)
