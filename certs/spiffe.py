"""SPIFFE IDs: parse and validate ``spiffe://<trust-domain>/<path>`` per the SPIFFE spec.

Pure. Every rejection names the input and the rule it broke.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshlet.errors import InputError

SCHEME = "spiffe://"
_TD_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255


class SpiffeIdError(InputError):
    """A string is not a valid SPIFFE ID (or trust domain)."""


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" for the trust domain's own ID, else "/seg/seg..."

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @classmethod
    def for_workload(cls, trust_domain: str, namespace: str, service: str) -> SpiffeId:
        """The mesh identity of a service: ``spiffe://TD/ns/NS/sa/NAME``."""
        return parse(f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service}")

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def workload(self) -> tuple[str, str] | None:
        """``(namespace, service)`` when the path is ``/ns/NS/sa/NAME``, else None."""
        seg = self.segments
        if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa":
            return seg[1], seg[3]
        return None


def validate_trust_domain(td: str) -> str:
    if not td:
        raise SpiffeIdError("trust domain is empty: use a name like example.org or mesh.local")
    if len(td) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError(f"trust domain {td[:40]!r}... is longer than 255 characters")
    if not _TD_CHARS.fullmatch(td):
        bad = sorted({c for c in td if not _TD_CHARS.fullmatch(c)})
        raise SpiffeIdError(
            f"trust domain {td!r} has characters SPIFFE does not allow ({''.join(bad)!r}): "
            "use lowercase letters, digits, '.', '-' and '_'"
        )
    return td


def parse(text: str, *, require_path: bool = False) -> SpiffeId:
    """Parse ``text`` as a SPIFFE ID; raise SpiffeIdError saying which rule it breaks."""
    where = f"SPIFFE ID {text!r}"
    if len(text) > MAX_ID_LENGTH:
        raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")
    if not text.startswith(SCHEME):
        if text.lower().startswith(SCHEME):
            raise SpiffeIdError(f"{where}: the scheme must be lowercase 'spiffe://'")
        raise SpiffeIdError(f"{where} must start with 'spiffe://'")
    rest = text[len(SCHEME) :]
    for char, name in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if char in rest:
            raise SpiffeIdError(f"{where} must not contain {name} ({char!r})")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise SpiffeIdError(f"{where} must not contain userinfo ('user@')")
    if ":" in authority:
        raise SpiffeIdError(f"{where} must not contain a port")
    if not authority:
        raise SpiffeIdError(f"{where} has no trust domain")
    try:
        validate_trust_domain(authority)
    except SpiffeIdError as e:
        raise SpiffeIdError(f"{where}: {e}") from None
    full_path = slash + path
    if full_path:
        for seg in full_path.split("/")[1:]:
            if seg == "":
                raise SpiffeIdError(f"{where} has an empty path segment (no '//' or trailing '/')")
            if seg in (".", ".."):
                raise SpiffeIdError(f"{where} has a {seg!r} path segment, which SPIFFE forbids")
            if not _SEGMENT_CHARS.fullmatch(seg):
                raise SpiffeIdError(
                    f"{where}: path segment {seg!r} may use only letters, digits, '.', '-', '_'"
                )
    elif require_path:
        raise SpiffeIdError(f"{where} has no path: use spiffe://{authority}/ns/NAMESPACE/sa/NAME")
    return SpiffeId(trust_domain=authority, path=full_path)
