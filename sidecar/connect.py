"""Opening the mutual-TLS leg to a peer sidecar, for the L4 relay and the L7 pool alike.

For: connect + handshake under one timeout, then the check that the peer presents
exactly the SPIFFE ID the control plane lists for that endpoint. Every failure becomes
``ConnectFailed`` with a short, stable reason (the ``reason`` label of
``meshlet_tcp_connect_errors_total``).

Must never: return a leg whose peer identity was not checked, or build an SSLContext
(the caller passes the one for its protocol: no ALPN for L4, ``http/1.1`` for L7).
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from cryptography import x509

from certs.spiffe import SpiffeIdError
from certs.spiffe import parse as parse_spiffe_id
from certs.verify import Expectation, check_identity
from meshlet.model import Endpoint
from sidecar.tlsleg import TlsHandshakeError, TlsLeg

log = logging.getLogger(__name__)


class ConnectFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def open_mtls(endpoint: Endpoint, ctx: ssl.SSLContext, connect_s: float) -> TlsLeg:
    """A TlsLeg to ``endpoint``'s inbound port whose peer is ``endpoint.identity``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_s):
            _, leg = await loop.create_connection(
                lambda: TlsLeg(ctx, server_side=False, handshake_timeout_s=connect_s),
                endpoint.address,
                endpoint.inbound_port,
            )
            await leg.handshake
    except TimeoutError:
        raise ConnectFailed("timeout") from None
    except TlsHandshakeError as e:
        raise ConnectFailed(f"tls_{e.reason}") from None
    except OSError as e:
        raise ConnectFailed(
            "refused" if isinstance(e, ConnectionRefusedError) else "connect_error"
        ) from None
    der = leg.peer_certificate()
    try:
        expect = Expectation.exactly(parse_spiffe_id(endpoint.identity))
    except SpiffeIdError:
        leg.abort()
        raise ConnectFailed("bad_identity") from None
    verdict = check_identity(x509.load_der_x509_certificate(der), expect) if der else None
    if verdict is None or not verdict.ok:
        leg.abort()
        log.warning(
            "peer identity refused",
            extra={"endpoint": endpoint.id, "want": endpoint.identity, "verdict": str(verdict)},
        )
        raise ConnectFailed(f"identity_{verdict.reason.value if verdict else 'none'}")
    return leg
