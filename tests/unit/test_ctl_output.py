"""What the CLI shows and accepts without a server: --server forms, table rows, plain
tables, and `describe service` text (meshlet.apiclient, meshlet.ctl_render)."""

from __future__ import annotations

import io

import pytest

from meshlet import wire
from meshlet.apiclient import normalize_server
from meshlet.ctl_render import (
    describe_service,
    endpoint_rows,
    plain_table,
    print_table,
    service_rows,
    vip_rows,
)
from meshlet.errors import InputError
from meshlet.model import Service, ServicePort
from meshlet.policy import Policy, Route, RouteMatch, WeightedBackend


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("http://127.0.0.1:15080", "http://127.0.0.1:15080"),
        ("http://127.0.0.1:15080/", "http://127.0.0.1:15080"),
        ("127.0.0.1:15080", "http://127.0.0.1:15080"),
        (":15080", "http://127.0.0.1:15080"),
        ("[::1]:15080", "http://[::1]:15080"),
        ("https://cp.example:8443/mesh/", "https://cp.example:8443/mesh"),
        ("localhost", "http://localhost"),
    ],
)
def test_server_forms(given: str, url: str) -> None:
    assert normalize_server(given) == url


@pytest.mark.parametrize("given", ["", "ftp://x:1", "http://:80", "127.0.0.1:http", "h:99999"])
def test_bad_servers_are_input_errors(given: str) -> None:
    with pytest.raises(InputError, match="--server"):
        normalize_server(given)


def ep(id_: str, health: str = "healthy", **extra: object) -> dict[str, object]:
    data = {
        "id": id_,
        "namespace": "shop",
        "service": "orders",
        "address": "198.19.1.7",
        "inbound_port": 15006,
        "app_port": 8080,
        "node": None,
        "labels": {"version": "v1", "app": "orders"},
        "health": health,
    }
    return {**data, **extra}


def test_rows_for_services_endpoints_and_vips() -> None:
    services = [
        {
            "namespace": "shop",
            "name": "orders",
            "vip": "198.19.128.1",
            "ports": [{"port": 8080, "protocol": "http"}, {"port": 9090, "protocol": "grpc"}],
        },
        {"namespace": "shop", "name": "web", "vip": "198.19.128.2", "ports": [{"port": 80}]},
    ]
    endpoints = [ep("a"), ep("b", "draining"), ep("c", address="::1")]
    assert service_rows(services, endpoints) == [
        ("shop", "orders", "198.19.128.1", "8080/http,9090/grpc", "2/3"),
        ("shop", "web", "198.19.128.2", "80/auto", "0/0"),
    ]
    rows = endpoint_rows(endpoints)
    assert rows[0] == (
        "a",
        "shop/orders",
        "198.19.1.7:15006",
        "8080",
        "-",
        "healthy",
        "app=orders,version=v1",
    )
    assert rows[2][2] == "[::1]:15006"
    assert vip_rows([{"vip": "198.19.128.1", "service": "shop/orders", "ports": []}]) == [
        ("198.19.128.1", "shop/orders", "-")
    ]


def test_plain_tables_align_without_trailing_blanks() -> None:
    text = plain_table(("A", "LONGER"), [("x", "1"), ("wider-cell", "")])
    assert text == "A            LONGER\nx            1\nwider-cell\n"


def test_a_terminal_gets_a_rich_table() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    print_table(("NAME", "VIP"), [("orders", "198.19.128.1")], out)
    assert "orders" in out.getvalue() and "198.19.128.1" in out.getvalue()
    plain = io.StringIO()
    print_table(("NAME", "VIP"), [("orders", "198.19.128.1")], plain)
    assert plain.getvalue() == "NAME     VIP\norders   198.19.128.1\n"


def test_describe_shows_every_policy_field_in_model_order() -> None:
    policy = Policy(
        routes=(
            Route(
                name="canary",
                match=RouteMatch(path_prefix="/api", methods=("GET",)),
                backends=(
                    WeightedBackend(labels={"version": "v1"}, weight=3),
                    WeightedBackend(labels={"version": "v2"}, weight=1),
                ),
            ),
        ),
        allowed_callers=("shop/*",),
    )
    svc = Service(
        namespace="shop",
        name="orders",
        ports=(ServicePort(port=8080),),
        vip="198.19.128.1",
        policy=policy,
    )
    text = describe_service(
        wire.to_data(svc), [ep("a", last_heartbeat_age_s=2.4), ep("b", "unhealthy")]
    )
    lines = [line.split() for line in text.splitlines()]
    assert ["Endpoints:", "1", "healthy", "of", "2"] in lines
    keys = [line[0] for line in lines if line]
    assert keys.index("attempts") < keys.index("on_statuses") < keys.index("budget")
    for default in (["connect_s", "5"], ["request_s", "none"], ["max_pending", "1024"]):
        assert default in lines
    assert "path_prefix=/api methods=GET" in text
    assert "version=v1 75% (weight 3), version=v2 25% (weight 1)" in text
    assert ["allowed_callers", "shop/*"] in lines
    assert [
        "a",
        "198.19.1.7:15006",
        "8080",
        "-",
        "healthy",
        "app=orders,version=v1",
        "2s",
        "ago",
    ] in lines
