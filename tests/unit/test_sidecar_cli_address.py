"""`meshlet sidecar run` in a container: a control plane named by DNS, and --address auto.

Pure: the route table is a file written here and the kernel's answer ("which address
would I send from?") is a stand-in, so no socket is opened.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlet.errors import InputError
from sidecar import cli_run

# /proc/net/route: the default route via 198.18.3.1 (little-endian hex) on eth0.
ROUTES = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\t010312C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "eth0\t000312C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("meshlet-control-plane:15010", ("meshlet-control-plane", 15010)),
        ("cp.shop.internal:15012", ("cp.shop.internal", 15012)),
        ("198.18.0.2:15010", ("198.18.0.2", 15010)),
        ("[::1]:15010", ("::1", 15010)),
        ("localhost:15010", ("localhost", 15010)),
    ],
)
def test_the_control_plane_may_be_named_by_dns(text: str, expected: tuple[str, int]) -> None:
    assert cli_run._control_plane_address(text, what="--control-plane") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("meshlet-control-plane:grpc", "port 'grpc' is not a number"),
        ("meshlet-control-plane:0", "port 0 is out of range 1-65535"),
        ("meshlet-control-plane", "must be HOST:PORT"),
        ("198.18.0:15010", "'198.18.0' is not an IP address"),
        ("bad_name:15010", "'bad_name' is not an IP address"),
    ],
)
def test_a_bad_control_plane_address_is_named(text: str, message: str) -> None:
    with pytest.raises(InputError, match="--control-plane") as e:
        cli_run._control_plane_address(text, what="--control-plane")
    assert message in str(e.value)


def fake_kernel(answers: dict[str, str | None]) -> object:
    return lambda destination: answers.get(destination)


def test_auto_takes_the_address_toward_the_control_plane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "route").write_text(ROUTES)
    monkeypatch.setattr(
        cli_run,
        "_source_address",
        fake_kernel({"198.18.9.2": "198.18.9.7", "198.18.3.1": "198.18.3.5"}),
    )
    assert cli_run._auto_address("198.18.9.2", route_table=str(tmp_path / "route")) == "198.18.9.7"


def test_auto_falls_back_to_the_default_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control plane on loopback (or not resolvable yet) says nothing about the
    address peers dial: the default route's source address does."""
    (tmp_path / "route").write_text(ROUTES)
    monkeypatch.setattr(
        cli_run,
        "_source_address",
        fake_kernel({"127.0.0.1": "127.0.0.1", "198.18.3.1": "198.18.3.5"}),
    )
    assert cli_run._auto_address("127.0.0.1", route_table=str(tmp_path / "route")) == "198.18.3.5"


def test_auto_without_a_route_says_what_to_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "route").write_text(ROUTES.splitlines(keepends=True)[0])
    monkeypatch.setattr(cli_run, "_source_address", fake_kernel({"127.0.0.1": "127.0.0.1"}))
    with pytest.raises(InputError, match=r"--address auto: .* like --address 198\.19\.0\.5"):
        cli_run._auto_address("127.0.0.1", route_table=str(tmp_path / "route"))
