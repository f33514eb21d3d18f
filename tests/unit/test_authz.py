"""allowed_callers: exact SPIFFE IDs, NS/NAME, NS/*, and the default (whole trust domain)."""

from __future__ import annotations

import pytest

from certs.spiffe import parse
from sidecar.authz import caller_allowed

WEB = parse("spiffe://mesh.test/ns/shop/sa/web")
JOB = parse("spiffe://mesh.test/ns/batch/sa/job")
FOREIGN = parse("spiffe://other.test/ns/shop/sa/web")


@pytest.mark.parametrize(
    ("caller", "allowed", "ok"),
    [
        (WEB, None, True),
        (FOREIGN, None, False),
        (WEB, [], False),
        (WEB, ["shop/web"], True),
        (JOB, ["shop/web"], False),
        (WEB, ["shop/*"], True),
        (JOB, ["shop/*"], False),
        (JOB, ["spiffe://mesh.test/ns/batch/sa/job"], True),
        (WEB, ["spiffe://mesh.test/ns/batch/sa/job", "shop/*"], True),
        (FOREIGN, ["shop/web"], False),
        (parse("spiffe://mesh.test/machine/7"), ["shop/*"], False),
    ],
)
def test_allowed_callers(caller: object, allowed: list[str] | None, ok: bool) -> None:
    assert caller_allowed(caller, allowed, "mesh.test") is ok  # type: ignore[arg-type]
