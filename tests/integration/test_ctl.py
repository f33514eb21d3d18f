"""`meshlet get|describe|apply|delete` as a user runs them: subprocesses of the CLI against a
real control-plane process (its own data dir, ports 0). Each test works in its own
namespace, so the shared process's state never couples them."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_plane_helpers import ControlPlaneProcess
from ruamel.yaml import YAML

pytestmark = pytest.mark.integration

VIP_RANGE = ipaddress.ip_network("198.19.128.0/17")


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    proc = ControlPlaneProcess(tmp_path_factory.mktemp("ctl") / "data")
    try:
        yield proc.start()
    finally:
        proc.kill()


def meshlet(
    cp: ControlPlaneProcess | None, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}
    if cp is not None:
        environ["MESHLET_SERVER"] = cp.info["api"]  # HOST:PORT, as users paste it
        environ["MESHLET_TOKEN_FILE"] = str(cp.token_file)
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "meshlet", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshlet: error: "), lines
    return lines[0]


def shop_yaml(ns: str) -> str:
    return textwrap.dedent(
        f"""\
        # two services; orders splits /api 90/10 between v1 and v2
        kind: Service
        namespace: {ns}
        name: orders
        ports:
          - {{port: 8080, protocol: http}}
        policy:
          retries: {{attempts: 2, on_statuses: [503]}}
          circuit_breaker: {{max_requests: 100, max_pending: 50}}
          routes:
            - name: canary
              match: {{path_prefix: /api}}
              backends:
                - {{labels: {{version: v1}}, weight: 90}}
                - {{labels: {{version: v2}}, weight: 10}}
        ---
        kind: Service
        namespace: {ns}
        name: web
        ports: [{{port: 80, protocol: http}}, {{port: 9090, protocol: grpc}}]
        """
    )


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def register(cp: ControlPlaneProcess, ns: str, id_: str, address: str, version: str) -> None:
    body = {
        "id": id_,
        "namespace": ns,
        "service": "orders",
        "address": address,
        "app_port": 8080,
        "labels": {"version": version},
    }
    assert cp.call("POST", "/v1/endpoints", body).status == 201


# ---- apply, get, describe ----------------------------------------------------------------------


def test_apply_creates_then_reapply_changes_nothing(
    cp: ControlPlaneProcess, tmp_path: Path
) -> None:
    path = write(tmp_path, "shop.yaml", shop_yaml("apply"))
    assert ok(meshlet(cp, "apply", "-f", path)).splitlines() == [
        "service/apply/orders created",
        "service/apply/web created",
    ]
    before = cp.revision()
    assert ok(meshlet(cp, "apply", "-f", path)).splitlines() == [
        "service/apply/orders unchanged",
        "service/apply/web unchanged",
    ]
    assert cp.revision() == before
    orders = cp.call("GET", "/v1/services/apply/orders").data
    assert orders["policy"]["retries"]["attempts"] == 2
    assert [b["weight"] for b in orders["policy"]["routes"][0]["backends"]] == [90, 10]


def test_apply_reports_configured_when_the_policy_changes(
    cp: ControlPlaneProcess, tmp_path: Path
) -> None:
    path = write(tmp_path, "a.yaml", shop_yaml("conf"))
    ok(meshlet(cp, "apply", "-f", path))
    vip = cp.call("GET", "/v1/services/conf/orders").data["vip"]
    before = cp.revision()
    changed = shop_yaml("conf").replace("attempts: 2", "attempts: 4")
    assert ok(meshlet(cp, "apply", "-f", "-", stdin=changed)).splitlines() == [
        "service/conf/orders configured",
        "service/conf/web unchanged",
    ]
    assert cp.revision() == before + 1
    after = cp.call("GET", "/v1/services/conf/orders").data
    assert after["policy"]["retries"]["attempts"] == 4
    assert after["vip"] == vip  # the VIP is stable across updates


def test_get_services_table_json_and_yaml(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    ok(meshlet(cp, "apply", "-f", write(tmp_path, "s.yaml", shop_yaml("get"))))
    register(cp, "get", "get-orders-1", "198.19.1.7", "v1")

    table = ok(meshlet(cp, "get", "services", "-n", "get")).splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "VIP", "PORTS", "ENDPOINTS"]
    rows = {line.split()[1]: line.split() for line in table[1:]}
    assert set(rows) == {"orders", "web"}
    assert rows["orders"][3:] == ["8080/http", "1/1"]
    assert rows["web"][3:] == ["80/http,9090/grpc", "0/0"]
    assert all(ipaddress.ip_address(r[2]) in VIP_RANGE for r in rows.values())

    as_json = json.loads(ok(meshlet(cp, "get", "svc", "-n", "get", "-o", "json")))
    assert as_json["revision"] >= 1
    assert {s["name"]: s["vip"] for s in as_json["items"]} == {
        name: row[2] for name, row in rows.items()
    }
    as_yaml = YAML(typ="safe").load(ok(meshlet(cp, "get", "services", "-n", "get", "-o", "yaml")))
    assert as_yaml["items"] == as_json["items"]


def test_get_endpoints_nodes_and_vips(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    ok(meshlet(cp, "apply", "-f", write(tmp_path, "s.yaml", shop_yaml("kinds"))))
    node = {"underlay_address": "198.18.0.42", "vtep_mac": "02:42:c6:12:00:2a"}
    subnet = cp.call("PUT", "/v1/nodes/kinds-node", node).data["subnet"]
    register(cp, "kinds", "kinds-orders-1", "198.19.5.7", "v2")

    endpoints = ok(meshlet(cp, "get", "endpoints", "-n", "kinds")).splitlines()
    assert endpoints[0].split() == [
        "ID",
        "SERVICE",
        "ADDRESS",
        "APP-PORT",
        "NODE",
        "HEALTH",
        "LABELS",
    ]
    assert endpoints[1].split() == [
        "kinds-orders-1",
        "kinds/orders",
        "198.19.5.7:15006",
        "8080",
        "-",
        "healthy",
        "version=v2",
    ]

    nodes = ok(meshlet(cp, "get", "nodes")).splitlines()
    assert nodes[0].split() == ["NAME", "UNDERLAY", "SUBNET", "VTEP-MAC", "HEALTH"]
    assert ["kinds-node", "198.18.0.42", subnet, "02:42:c6:12:00:2a", "healthy"] in [
        line.split() for line in nodes[1:]
    ]

    vips = ok(meshlet(cp, "get", "vips", "-n", "kinds")).splitlines()
    assert vips[0].split() == ["VIP", "SERVICE", "PORTS"]
    assert [line.split()[1:] for line in vips[1:]] == [
        ["kinds/orders", "8080/http"],
        ["kinds/web", "80/http,9090/grpc"],
    ]
    vip_json = json.loads(ok(meshlet(cp, "get", "vips", "-o", "json", "-n", "kinds")))
    assert [v["vip"] for v in vip_json["items"]] == [line.split()[0] for line in vips[1:]]


def test_describe_shows_effective_policy_and_endpoints(
    cp: ControlPlaneProcess, tmp_path: Path
) -> None:
    ok(meshlet(cp, "apply", "-f", write(tmp_path, "s.yaml", shop_yaml("desc"))))
    register(cp, "desc", "desc-orders-1", "198.19.2.7", "v1")
    register(cp, "desc", "desc-orders-2", "198.19.3.7", "v2")
    drain = cp.call("PUT", "/v1/endpoints/desc-orders-2/health", {"health": "draining"})
    assert drain.status == 200
    vip = cp.call("GET", "/v1/services/desc/orders").data["vip"]

    text = ok(meshlet(cp, "describe", "service", "desc/orders"))
    lines = [line.split() for line in text.splitlines()]
    assert ["Service:", "desc/orders"] in lines
    assert ["VIP:", vip] in lines
    assert ["Endpoints:", "1", "healthy", "of", "2"] in lines
    assert ["attempts", "2"] in lines  # set in the file
    assert ["on_statuses", "503"] in lines
    assert ["max_requests", "100"] in lines
    assert ["max_connections", "1024"] in lines  # a default, shown too
    assert ["connect_s", "5"] in lines
    assert ["algorithm", "p2c_ewma"] in lines
    assert "version=v1 90% (weight 90), version=v2 10% (weight 10)" in text
    assert "path_prefix=/api" in text
    by_id = {line[0]: line for line in lines if line and line[0].startswith("desc-orders-")}
    assert by_id["desc-orders-1"][1:6] == ["198.19.2.7:15006", "8080", "-", "healthy", "version=v1"]
    assert by_id["desc-orders-2"][4:6] == ["draining", "version=v2"]

    as_json = json.loads(ok(meshlet(cp, "describe", "service", "desc/orders", "-o", "json")))
    assert as_json["service"]["vip"] == vip
    assert [e["id"] for e in as_json["endpoints"]] == ["desc-orders-1", "desc-orders-2"]


def test_describe_a_missing_service_is_one_line_exit_2(cp: ControlPlaneProcess) -> None:
    line = one_error_line(meshlet(cp, "describe", "service", "nowhere/orders"), 2)
    assert "nowhere/orders does not exist" in line


# ---- bad files: nothing is applied -------------------------------------------------------------


GOOD = "kind: Service\nnamespace: {ns}\nname: first\nports: [{port: 8080}]\n"
BAD_FILES = {
    "unknown-field": (GOOD + "colour: blue\n", "document 1: unknown field(s) colour"),
    "unknown-policy-field": (
        GOOD + "policy: {retries: {atempts: 2}}\n",
        "policy.retries.atempts: unknown field",
    ),
    "malformed-yaml": (GOOD + "policy: {retries: [\n", "not valid YAML at line"),
    "bad-port": (GOOD.replace("8080", "70000"), "port 70000 is out of range 1-65535"),
    "unknown-kind": (GOOD.replace("Service", "Deployment"), "kind 'Deployment' is not supported"),
    "second-document-bad": (
        GOOD + "---\nkind: Service\nnamespace: {ns}\nname: second\nports: []\n",
        "document 2 ({ns}/second): service {ns}/second needs at least one port",
    ),
    "same-service-twice": (GOOD + "---\n" + GOOD, "document 2 declares service/{ns}/first again"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_applies_nothing(cp: ControlPlaneProcess, tmp_path: Path, case: str) -> None:
    ns = f"bad-{case}"
    text, expected = BAD_FILES[case]
    path = write(tmp_path, "bad.yaml", text.replace("{ns}", ns))
    before = cp.revision()
    line = one_error_line(meshlet(cp, "apply", "-f", path), 2)
    assert expected.replace("{ns}", ns) in line
    assert path in line  # names the file
    assert cp.revision() == before
    assert cp.call("GET", f"/v1/services/{ns}/first").status == 404  # not even the good one


def test_a_missing_file_is_exit_2(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    before = cp.revision()
    good = write(tmp_path, "good.yaml", GOOD.replace("{ns}", "missing-file"))
    line = one_error_line(meshlet(cp, "apply", "-f", good, "-f", str(tmp_path / "nope.yaml")), 2)
    assert "nope.yaml does not exist" in line
    assert cp.revision() == before


# ---- delete ------------------------------------------------------------------------------------


def test_delete_service(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    ok(meshlet(cp, "apply", "-f", write(tmp_path, "s.yaml", shop_yaml("del"))))
    register(cp, "del", "del-orders-1", "198.19.4.7", "v1")
    out = ok(meshlet(cp, "delete", "service", "del/orders")).splitlines()
    assert out == ["service/del/orders deleted", "endpoint/del-orders-1 deleted"]
    assert cp.call("GET", "/v1/services/del/orders").status == 404
    assert ok(meshlet(cp, "get", "services", "-n", "del")).split("\n")[1].split()[1] == "web"

    line = one_error_line(meshlet(cp, "delete", "service", "del/orders"), 2)
    assert "del/orders does not exist" in line
    assert ok(meshlet(cp, "delete", "service", "del/orders", "--ignore-not-found")) == ""
    assert "NAMESPACE/NAME" in one_error_line(meshlet(cp, "delete", "service", "orders"), 2)


# ---- connection and auth failures --------------------------------------------------------------


def test_unreachable_server_is_one_line_exit_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    line = one_error_line(meshlet(None, "get", "services", "--server", f"127.0.0.1:{port}"), 1)
    assert f"cannot reach the control plane at http://127.0.0.1:{port} (connection refused)" in line
    assert "--server or MESHLET_SERVER" in line


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # the kernel completes the handshake; nobody ever answers
        port = s.getsockname()[1]
        result = meshlet(None, "get", "vips", "--timeout", "300ms", MESHLET_SERVER=f":{port}")
    line = one_error_line(result, 1)
    assert "no answer within 0.3s" in line


def test_wrong_or_missing_token_is_one_line_exit_1(cp: ControlPlaneProcess) -> None:
    before = cp.revision()
    wrong = meshlet(cp, "apply", "-f", "-", "--token", "nope", stdin=GOOD.replace("{ns}", "tok"))
    line = one_error_line(wrong, 1)
    assert "refused the admin token" in line and "--token-file" in line
    missing = meshlet(cp, "get", "services", MESHLET_TOKEN_FILE="")
    assert "needs an admin token" in one_error_line(missing, 1)
    assert cp.revision() == before
    assert cp.call("GET", "/v1/services/tok/first").status == 404


def test_exit_codes_are_in_the_help() -> None:
    for command in ("get", "describe", "apply", "delete"):
        text = ok(meshlet(None, command, "--help"))
        assert "Exit codes:" in text and "MESHLET_TOKEN_FILE" in text, command
