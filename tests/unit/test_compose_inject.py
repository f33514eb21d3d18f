"""`meshlet inject` / `uninject` on compose files (compose/inject*.py): the corpus in
tests/data/compose against its checked-in injected outputs, what the generated services
look like to docker-compose and to the user, each refused input, and properties over
generated compose files (inject is idempotent; uninject gives back the bytes).

Regenerate the golden files with MESHLET_REGEN_GOLDEN=1 (then read the diff).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from compose.inject import inject, uninject
from compose.inject_build import Settings
from compose.inject_yaml import guess_indent, load
from meshlet.errors import InputError

DATA = Path(__file__).resolve().parent.parent / "data" / "compose"
GOLDEN = DATA / "injected"
CORPUS = sorted(DATA.glob("*.yml"))
SETTINGS = Settings(project="demo")
REGEN = os.environ.get("MESHLET_REGEN_GOLDEN") == "1"


def _inject(text: str, **kw: Any) -> str:
    return inject(text, source="test.yml", settings=Settings(project="demo", **kw)).text


def _data(text: str) -> Any:
    """The injected YAML as plain data, read the way docker-compose reads it (safe)."""
    return YAML(typ="safe", pure=True).load(text)


def test_the_corpus_is_big_enough_and_round_trips_through_ruamel() -> None:
    assert len(CORPUS) >= 12
    for path in CORPUS:
        text = path.read_text()
        assert load(text, source=path.name).dump() == text, path.name


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_matches_its_golden_file(path: Path) -> None:
    out = inject(path.read_text(), source=path.name, settings=SETTINGS).text
    golden = GOLDEN / path.name
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(out)
    assert out == golden.read_text()


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_uninject_gives_back_the_bytes_and_inject_is_idempotent(path: Path) -> None:
    text = path.read_text()
    injected = inject(text, source=path.name, settings=SETTINGS)
    assert uninject(injected.text, source=path.name).text == text
    again = inject(injected.text, source=path.name, settings=SETTINGS)
    assert again.text == injected.text
    assert again.changed is False


def test_docker_compose_accepts_every_injected_corpus_file(tmp_path: Path) -> None:
    """`docker-compose config -q` validates against compose's own schema, no engine needed."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is in scripts/apt-packages.txt: run `make bootstrap`"
    for golden in sorted(GOLDEN.glob("*.yml")):
        target = tmp_path / golden.stem / "docker-compose.yml"
        target.parent.mkdir()
        target.write_text(golden.read_text())
        done = subprocess.run(
            [binary, "-f", str(target), "config", "-q"],
            cwd=target.parent,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "APP_PORT": "7000"},
        )
        assert done.returncode == 0, f"{golden.name}: {done.stderr}"


# --- what the injected file says ------------------------------------------------------

WEB = """\
services:
  web:
    image: nginx
    ports:
      - "8080:80"
    networks: [front, back]
    hostname: web-1
    depends_on:
      - db
  db:
    image: postgres
    x-meshlet:
      inject: false
networks:
  front:
  back:
"""


def test_the_app_joins_its_sidecar_which_takes_its_network_settings() -> None:
    data = _data(_inject(WEB))
    svc = data["services"]
    web, sidecar, init = svc["web"], svc["web-meshlet"], svc["web-meshlet-init"]
    assert web["network_mode"] == "service:web-meshlet"
    assert web["depends_on"] == {
        "web-meshlet-init": {"condition": "service_completed_successfully"},
        "web-meshlet": {"condition": "service_healthy"},
        "db": {"condition": "service_started"},
    }
    for key in ("ports", "networks", "hostname"):
        assert key not in web
    assert sidecar["ports"] == ["8080:80"]
    assert sidecar["hostname"] == "web-1"
    assert sidecar["networks"] == {"front": {"aliases": ["web"]}, "back": {"aliases": ["web"]}}
    assert sidecar["user"] == "1337:1337"
    assert sidecar["cap_drop"] == ["ALL"] and "cap_add" not in sidecar
    assert sidecar["volumes"] == ["meshlet-public:/var/lib/meshlet-public:ro"]  # no CA keys
    assert sidecar["depends_on"] == {"meshlet-control-plane": {"condition": "service_healthy"}}
    assert "/ready" in sidecar["healthcheck"]["test"][-1]
    assert init["network_mode"] == "service:web-meshlet"
    assert init["user"] == "root"
    assert init["cap_drop"] == ["ALL"] and init["cap_add"] == ["NET_ADMIN"]
    assert init["command"][:2] == ["sidecar", "init"]
    assert "db-meshlet" not in svc


def test_the_sidecar_command_names_the_service_in_the_project_namespace() -> None:
    cmd = _data(_inject(WEB))["services"]["web-meshlet"]["command"]
    assert cmd[:2] == ["sidecar", "run"]
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=False))
    assert flags["--service"] == "demo/web"
    assert flags["--app-port"] == "80"
    assert flags["--control-plane"] == "meshlet-control-plane:15010"
    assert flags["--control-plane-mtls"] == "meshlet-control-plane:15012"
    assert flags["--address"] == "auto"
    assert flags["--ca-bundle"] == "/var/lib/meshlet-public/bundle.pem"
    assert flags["--join-token"] == "/var/lib/meshlet-public/join-token"
    assert flags["--admin"] == "127.0.0.1:15000"
    assert "--app-protocol" not in flags  # not declared: the sidecar detects it


def test_only_inits_and_the_node_helper_have_net_admin() -> None:
    services = _data(_inject(WEB))["services"]
    with_admin = sorted(n for n, s in services.items() if "NET_ADMIN" in s.get("cap_add", []))
    assert with_admin == ["meshlet-node", "web-meshlet-init"]
    assert services["meshlet-node"]["network_mode"] == "host"


def test_control_plane_node_volume_and_network_are_added_once() -> None:
    out = _inject(WEB)
    data = _data(out)
    cp = data["services"]["meshlet-control-plane"]
    assert cp["volumes"] == [
        "meshlet-data:/var/lib/meshlet",
        "meshlet-public:/var/lib/meshlet-public",
    ]
    flags = dict(zip(cp["command"][2::2], cp["command"][3::2], strict=False))
    assert flags["--public-dir"] == "/var/lib/meshlet-public"
    assert cp["networks"] == ["default", "front", "back", "meshlet"]
    assert cp["ports"] == ["127.0.0.1:15010:15010"]
    assert "--trust-domain" in cp["command"]
    assert list(data["volumes"]) == ["meshlet-data", "meshlet-public"]
    assert data["volumes"]["meshlet-data"] is None
    assert data["volumes"]["meshlet-public"]["driver_opts"]["o"] == "uid=1337,gid=1337,mode=0755"
    mounts = {n: s.get("volumes", []) for n, s in data["services"].items()}
    assert not [
        n
        for n, m in mounts.items()
        if n != "meshlet-control-plane" and any("meshlet-data" in v for v in m)
    ]
    assert data["networks"] == {"front": None, "back": None, "meshlet": None}
    assert _inject(out) == out


def test_no_node_and_other_image_and_trust_domain() -> None:
    data = _data(_inject(WEB, node=False, image="registry.test/meshlet:1", trust_domain="td.test"))
    services = data["services"]
    assert "meshlet-node" not in services
    assert "ports" not in services["meshlet-control-plane"]
    assert {s["image"] for n, s in services.items() if "meshlet" in n} == {
        "registry.test/meshlet:1"
    }
    cmd = services["meshlet-control-plane"]["command"]
    assert cmd[cmd.index("--trust-domain") + 1] == "td.test"


def test_x_meshlet_overrides_reach_the_sidecar_and_init() -> None:
    text = """\
services:
  orders-v2:
    image: example/orders
    expose: ["8080", "9090"]
    x-meshlet:
      identity: orders
      protocol: {8080: http}
      labels: {version: v2}
      exclude-ports: [5432]
"""
    result = inject(text, source="t.yml", settings=SETTINGS)
    assert result.report[0] == (
        "orders-v2: injected (port 8080 in the mesh; 9090 not: a sidecar serves one port)"
    )
    services = _data(result.text)["services"]
    cmd = services["orders-v2-meshlet"]["command"]
    assert cmd[cmd.index("--service") + 1] == "demo/orders"
    assert cmd[cmd.index("--app-protocol") + 1] == "http"
    assert cmd[cmd.index("--label") + 1] == "version=v2"
    init = services["orders-v2-meshlet-init"]["command"]
    assert init[init.index("--exclude-ports") + 1] == "5432"


def test_replicas_get_a_sidecar_each_and_share_the_alias() -> None:
    text = """\
services:
  whoami:
    image: example/whoami
    ports: ["8080:8080"]
    x-meshlet:
      replicas: 3
"""
    result = inject(text, source="t.yml", settings=SETTINGS)
    assert result.report[0] == "whoami: injected (3 replicas: whoami, whoami-2, whoami-3)"
    services = _data(result.text)["services"]
    for name in ("whoami", "whoami-2", "whoami-3"):
        assert services[name]["network_mode"] == f"service:{name}-meshlet"
        assert services[name]["image"] == "example/whoami"
        sidecar = services[f"{name}-meshlet"]
        assert sidecar["networks"] == {"default": {"aliases": ["whoami"]}}
        cmd = sidecar["command"]
        assert cmd[cmd.index("--service") + 1] == "demo/whoami"
        assert f"{name}-meshlet-init" in services
    assert "x-meshlet" not in services["whoami-2"]
    assert services["whoami-meshlet"]["ports"] == ["8080:8080"]
    assert "ports" not in services["whoami-2-meshlet"]  # one host port: the first replica's


def test_skipped_services_are_reported_with_the_reason() -> None:
    result = inject((DATA / "skipped.yml").read_text(), source="s.yml", settings=SETTINGS)
    assert result.report == (
        "app: injected",
        "migrate: skipped (x-meshlet.inject: false)",
        "host-agent: skipped (x-meshlet.inject: false)",
        "cron: injected (outbound only: no port declared, so it calls the mesh but serves "
        "nothing through it; add x-meshlet.ports: [PORT] to mesh what it serves)",
        "meshlet-node: skipped (a meshlet service, left as it is)",
        "meshlet-control-plane: added",
    )


def test_a_file_with_nothing_to_inject_comes_back_unchanged() -> None:
    text = (
        "services:\n  cron:\n    image: example/cron  # left out\n    x-meshlet: {inject: false}\n"
    )
    result = inject(text, source="t.yml", settings=SETTINGS)
    assert result.text == text and result.changed is False
    assert result.report == ("cron: skipped (x-meshlet.inject: false)",)
    assert uninject(text, source="t.yml").text == text


def test_a_service_without_a_port_gets_an_outbound_only_sidecar() -> None:
    """A worker or a job calls the mesh by name (so it needs a sidecar and an identity)
    but serves nothing: its sidecar runs without --app-port and registers no endpoint."""
    text = "services:\n  worker:\n    image: example/worker  # calls orders, serves nothing\n"
    result = inject(text, source="t.yml", settings=SETTINGS)
    services = _data(result.text)["services"]
    assert services["worker"]["network_mode"] == "service:worker-meshlet"
    cmd = services["worker-meshlet"]["command"]
    assert cmd[cmd.index("--service") + 1] == "demo/worker"
    assert "--app-port" not in cmd and "--app-protocol" not in cmd and "--label" not in cmd
    assert services["worker-meshlet"]["networks"] == {"default": {"aliases": ["worker"]}}
    assert "NET_ADMIN" in services["worker-meshlet-init"]["cap_add"]
    assert result.report[0] == (
        "worker: injected (outbound only: no port declared, so it calls the mesh but serves "
        "nothing through it; add x-meshlet.ports: [PORT] to mesh what it serves)"
    )
    assert uninject(result.text, source="t.yml").text == text
    assert inject(result.text, source="t.yml", settings=SETTINGS).text == result.text


def test_a_port_set_from_the_environment_is_named_in_the_report() -> None:
    text = 'services:\n  api:\n    image: example/api\n    expose: ["${API_PORT}"]\n'
    result = inject(text, source="t.yml", settings=SETTINGS)
    assert result.report[0].startswith(
        "api: injected (outbound only: its port '${API_PORT}' is set from the environment"
    )


def test_labels_on_a_service_without_a_port_are_refused() -> None:
    text = "services:\n  worker:\n    image: w\n    x-meshlet: {labels: {version: v2}}\n"
    with pytest.raises(InputError) as e:
        inject(text, source="t.yml", settings=SETTINGS)
    assert str(e.value).startswith("t.yml: service 'worker': x-meshlet.labels")
    assert "no TCP port" in str(e.value) and "expose: [PORT]" in str(e.value)


def test_own_control_plane_without_healthcheck_is_waited_for_as_started() -> None:
    text = (DATA / "existing_control_plane.yml").read_text()
    services = _data(_inject(text))["services"]
    assert services["shop-meshlet"]["depends_on"] == {
        "meshlet-control-plane": {"condition": "service_started"}
    }
    assert "x-meshlet-generated" not in services["meshlet-control-plane"]


def test_comments_stay_where_they_belong() -> None:
    text = """\
services:
  web:
    image: nginx  # the web
    ports:
      - "80:80"  # public

  # the database
  db:
    image: postgres
    x-meshlet: {inject: false}
# the end
"""
    out = _inject(text)
    assert "    image: nginx  # the web\n\n  # the database\n  db:\n" in out
    assert '      - "80:80"  # public\n' in out  # moved to the sidecar, with its comment
    assert out.endswith("# the end\n")
    assert uninject(out, source="t").text == text


def test_crlf_line_endings_are_kept() -> None:
    text = WEB.replace("\n", "\r\n")
    out = _inject(text)
    assert "\r\n" in out and "\n" not in out.replace("\r\n", "")
    assert uninject(out, source="t").text == text


def test_indentation_is_guessed_from_the_file() -> None:
    assert guess_indent("a:\n  b:\n    - c\n") == (2, 4, 2)
    assert guess_indent("a:\n    b:\n    - c\n") == (4, 2, 0)
    assert guess_indent("a:\n   b: 1\n") == (3, 5, 3)
    assert guess_indent("a: 1\n") == (2, 4, 2)


# --- refused input ------------------------------------------------------------------

BAD = {
    "malformed": "not valid YAML at line 4, column 4",
    "top_level_list": "the top level is a list, not a mapping with services:",
    "services_list": "services: must be a mapping of service names",
    "empty": "is empty: a compose file needs services:",
    "merge_moved_key": "service 'web': networks comes from a merge key (<<)",
    "network_mode": "service 'agent' already uses network_mode: host",
    "duplicate_keys": 'found duplicate key "image"',
    "unknown_option": "unknown x-meshlet key(s) protocols: the keys are inject, ports",
    "bad_protocol": "x-meshlet.protocol: 80: 'http2' is not one of auto, tcp, http, grpc",
    "python_tag": "the tag !!python/object/apply:os.system is not allowed",
    "billion_laughs": "expand to more than 100000 values",
    "service_alias": "service 'web' is used again elsewhere through &web",
    "name_taken": "inject needs the service name 'web-meshlet', which is taken",
    "scale": "deploy.replicas: 3: compose would join every replica",
    "two_documents": "a second YAML document starts at line 4",
    "sidecar_port": "service 'proxy' listens on port 15001, which its sidecar uses",
    "not_dns_label": "add x-meshlet.identity: web-api",
    "recursive_alias": "an alias refers to itself",
    "replicas_container_name": "x-meshlet.replicas 2 with container_name",
}


def test_every_bad_input_file_has_a_case() -> None:
    assert sorted(p.stem for p in (DATA / "bad").glob("*.yml")) == sorted(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_refused_with_one_clear_line(name: str) -> None:
    text = (DATA / "bad" / f"{name}.yml").read_text()
    with pytest.raises(InputError) as e:
        inject(text, source=f"{name}.yml", settings=SETTINGS)
    message = str(e.value)
    assert message.startswith(f"{name}.yml")
    assert BAD[name] in message
    assert "\n" not in message


def test_nothing_is_constructed_from_an_object_tag(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f'services:\n  web: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(InputError):
        inject(text, source="t.yml", settings=SETTINGS)
    with pytest.raises(InputError):
        uninject(text, source="t.yml")
    assert not marker.exists()


def test_unknown_x_meshlet_values_are_named() -> None:
    cases = {
        "inject: maybe": "x-meshlet.inject must be true or false, not 'maybe'",
        "replicas: 0": "x-meshlet.replicas must be a number from 1 to 64",
        "ports: [http]": "x-meshlet.ports: 'http' is not a port",
        "protocol: {9999: http}": "x-meshlet.protocol: 9999 is not one of the service's ports (80)",
        "identity: Web": "x-meshlet.identity 'Web' is not a DNS label",
        "labels: {version: [1]}": "x-meshlet.labels: version: [1] must be a word",
        "exclude-ports: 80": "x-meshlet.exclude-ports must be a list of ports",
    }
    for option, message in cases.items():
        text = f'services:\n  web:\n    image: nginx\n    expose: ["80"]\n    x-meshlet: {{{option}}}\n'
        with pytest.raises(InputError, match=None) as e:
            inject(text, source="t.yml", settings=SETTINGS)
        assert message in str(e.value), option
