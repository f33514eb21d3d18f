"""The services `meshlet inject` adds to a compose file, built as YAML nodes.

For: compose/inject.py, which decides what to inject (compose/inject_rules.py) and moves
the app's own settings; this module only spells out the generated services — sidecar,
init, control plane, node helper — so their layout lives in one place. The layout is a
contract (the image and the examples rely on it); compose/inject.py's docstring
describes it.

Must never: read or change the user's services, or take a value from anywhere but its
arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ruamel.yaml.comments import CommentedMap

from compose.inject_nodes import cmap, cseq, literal, quoted
from compose.inject_rules import DNS_PORT, INBOUND_PORT, OUTBOUND_PORT, MeshOptions

CONTROL_PLANE = "meshlet-control-plane"
NODE = "meshlet-node"
VOLUME = "meshlet-data"  # the control plane's data: CA keys, tokens, state
PUBLIC_VOLUME = "meshlet-public"  # only the bundle and the join token: what sidecars mount
NETWORK = "meshlet"  # the control plane's own network, for tools that call its API
GENERATED = "x-meshlet-generated"  # marks every service inject added: {role: ..., app: ...}
ORIGINAL = "x-meshlet-original"  # in an app's first sidecar: what uninject puts back
INJECTED = "x-meshlet-injected"  # top level: what inject added there
DATA_DIR = "/var/lib/meshlet"  # the control plane's --data-dir (the meshlet-data volume)
PUBLIC_DIR = "/var/lib/meshlet-public"  # meshlet-public: the control plane's --public-dir,
CA_BUNDLE = f"{PUBLIC_DIR}/bundle.pem"  # mounted read-only at the same path in sidecars
JOIN_TOKEN = f"{PUBLIC_DIR}/join-token"  # and the node helper
PROXY_UID = 1337
API_PORT, GRPC_PORT, GRPC_MTLS_PORT = 15080, 15010, 15012
SIDECAR_DNS = f"127.0.0.53:{DNS_PORT}"
CONTROL_PLANE_GRPC = f"{CONTROL_PLANE}:{GRPC_PORT}"
CONTROL_PLANE_MTLS = f"{CONTROL_PLANE}:{GRPC_MTLS_PORT}"
ENTRYPOINT = "meshlet"  # set on every generated service, whatever the image's entrypoint
NODE_NAME = "${MESHLET_NODE:-node1}"  # compose fills these in from the environment
UNDERLAY = "${MESHLET_UNDERLAY_ADDRESS:-127.0.0.1}"

# The image has no /var/lib/meshlet-public owned by 1337, so a plain named volume there
# would be root's: a tmpfs owned by 1337 instead (its files are rewritten at every start).
PUBLIC_VOLUME_OPTIONS = (
    ("driver_opts", (("type", "tmpfs"), ("device", "tmpfs"), ("o", "uid=1337,gid=1337,mode=0755"))),
)

# /ready also says whether the app accepts connections; the app starts only after the
# sidecar is healthy, so here the sidecar counts as ready when that is all that is missing.
SIDECAR_HEALTH = """\
import json, urllib.error, urllib.request
try:
    urllib.request.urlopen("http://{admin}/ready", timeout=3)
except urllib.error.HTTPError as e:
    reasons = json.load(e).get("reasons", [])
    raise SystemExit(any(not r.startswith("the app ") for r in reasons))
"""

CONTROL_PLANE_HEALTH = f"""\
import urllib.request
urllib.request.urlopen("http://127.0.0.1:{API_PORT}/readyz", timeout=3)
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The flags of `meshlet inject`."""

    project: str  # the mesh namespace: spiffe://<trust_domain>/ns/<project>/sa/<service>
    image: str = "meshlet:latest"
    trust_domain: str = "mesh.local"
    admin: str = "127.0.0.1:15000"  # the sidecar's admin listener (inside its container)
    node: bool = True  # add the node helper


def sidecar_name(app: str) -> str:
    return f"{app}-meshlet"


def init_name(app: str) -> str:
    return f"{app}-meshlet-init"


def replica_name(app: str, number: int) -> str:
    return app if number == 1 else f"{app}-{number}"


def marker(role: str, app: str | None = None, replica: int | None = None) -> CommentedMap:
    pairs: list[tuple[str, Any]] = [("role", role)]
    if app is not None:
        pairs.append(("app", app))
    if replica is not None and replica > 1:
        pairs.append(("replica", replica))
    return cmap(*pairs, flow=True)


def _health(script: str) -> CommentedMap:
    return cmap(
        ("test", cseq(["CMD", "python3", "-c", literal(script)])),
        ("interval", "3s"),
        ("timeout", "5s"),
        ("retries", 20),
    )


def _admin_probe_address(admin: str) -> str:
    host, _, port = admin.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "") else admin


def sidecar(
    *,
    app: str,
    group: str,
    replica: int,
    opts: MeshOptions,
    settings: Settings,
    networks: CommentedMap,
    profiles: Any,
) -> CommentedMap:
    """The sidecar of one app replica: it owns the network namespace the app joins."""
    args: list[Any] = [
        "sidecar",
        "run",
        "--service",
        f"{settings.project}/{opts.name}",
        "--mode",
        "transparent",
        "--control-plane",
        quoted(CONTROL_PLANE_GRPC),
        "--control-plane-mtls",
        quoted(CONTROL_PLANE_MTLS),
        "--address",
        "auto",
        "--ca-bundle",
        CA_BUNDLE,
        "--join-token",
        JOIN_TOKEN,
    ]
    if opts.port is not None:  # else outbound only: it calls the mesh and serves nothing
        args += ["--app-port", quoted(str(opts.port))]
    if opts.protocol is not None:
        args += ["--app-protocol", opts.protocol]
    args += ["--dns", quoted(SIDECAR_DNS), "--admin", quoted(settings.admin)]
    args += ["--node", NODE_NAME]
    for key, value in opts.labels:
        args += ["--label", f"{key}={value}"]
    pairs: list[tuple[str, Any]] = [
        ("image", settings.image),
        ("user", quoted(f"{PROXY_UID}:{PROXY_UID}")),
        ("entrypoint", cseq([ENTRYPOINT], flow=True)),
        ("command", cseq(args)),
        ("networks", networks),
        ("volumes", cseq([f"{PUBLIC_VOLUME}:{PUBLIC_DIR}:ro"])),
        ("depends_on", cmap((CONTROL_PLANE, cmap(("condition", "service_healthy"))))),
        ("healthcheck", _health(SIDECAR_HEALTH.format(admin=_admin_probe_address(settings.admin)))),
        ("cap_drop", cseq(["ALL"], flow=True)),
    ]
    if profiles is not None:
        pairs.append(("profiles", profiles))
    pairs.append((GENERATED, marker("sidecar", group, replica)))
    return cmap(*pairs)


def init(
    *, app: str, group: str, replica: int, opts: MeshOptions, settings: Settings, profiles: Any
) -> CommentedMap:
    """Installs the interception rules in the sidecar's namespace, then exits 0."""
    args: list[Any] = [
        "sidecar",
        "init",
        "--outbound-port",
        quoted(str(OUTBOUND_PORT)),
        "--inbound-port",
        quoted(str(INBOUND_PORT)),
        "--dns",
        quoted(SIDECAR_DNS),
        "--proxy-uid",
        quoted(str(PROXY_UID)),
    ]
    if opts.exclude_ports:
        args += ["--exclude-ports", quoted(",".join(map(str, opts.exclude_ports)))]
    pairs: list[tuple[str, Any]] = [
        ("image", settings.image),
        ("user", "root"),
        ("network_mode", quoted(f"service:{sidecar_name(app)}")),
        ("cap_drop", cseq(["ALL"], flow=True)),
        ("cap_add", cseq(["NET_ADMIN"], flow=True)),
        ("entrypoint", cseq([ENTRYPOINT], flow=True)),
        ("command", cseq(args)),
    ]
    if profiles is not None:
        pairs.append(("profiles", profiles))
    pairs.append((GENERATED, marker("init", group, replica)))
    return cmap(*pairs)


def app_dependencies(app: str) -> list[tuple[str, CommentedMap]]:
    """What the app waits for: its init done, its sidecar healthy."""
    return [
        (init_name(app), cmap(("condition", "service_completed_successfully"))),
        (sidecar_name(app), cmap(("condition", "service_healthy"))),
    ]


def control_plane(settings: Settings, *, networks: list[str]) -> CommentedMap:
    """On ``default``, every network a sidecar is on (so all of them reach it by name)
    and ``meshlet`` (for tools outside the mesh that call its API)."""
    args = [
        "control-plane",
        "run",
        "--data-dir",
        DATA_DIR,
        "--api",
        quoted(f"0.0.0.0:{API_PORT}"),
        "--grpc",
        quoted(f"0.0.0.0:{GRPC_PORT}"),
        "--grpc-mtls",
        quoted(f"0.0.0.0:{GRPC_MTLS_PORT}"),
        "--public-dir",
        PUBLIC_DIR,
        "--trust-domain",
        settings.trust_domain,
    ]
    pairs: list[tuple[str, Any]] = [
        ("image", settings.image),
        ("user", quoted(f"{PROXY_UID}:{PROXY_UID}")),
        ("entrypoint", cseq([ENTRYPOINT], flow=True)),
        ("command", cseq(args)),
        ("volumes", cseq([f"{VOLUME}:{DATA_DIR}", f"{PUBLIC_VOLUME}:{PUBLIC_DIR}"])),
        ("networks", cseq(networks)),
    ]
    if settings.node:  # the node helper is on the host's network: it dials loopback
        pairs.append(("ports", cseq([quoted(f"127.0.0.1:{GRPC_PORT}:{GRPC_PORT}")])))
    pairs += [
        ("healthcheck", _health(CONTROL_PLANE_HEALTH)),
        ("restart", "unless-stopped"),
        (GENERATED, marker("control-plane")),
    ]
    return cmap(*pairs)


def public_volume() -> CommentedMap:
    """The top-level entry of ``meshlet-public``."""
    return cmap(*((k, cmap(*v)) for k, v in PUBLIC_VOLUME_OPTIONS))


def node(settings: Settings) -> CommentedMap:
    args = [
        "node",
        "run",
        "--name",
        NODE_NAME,
        "--control-plane",
        quoted(f"127.0.0.1:{GRPC_PORT}"),
        "--ca-bundle",
        CA_BUNDLE,
        "--join-token",
        JOIN_TOKEN,
        "--underlay-address",
        UNDERLAY,
        "--teardown-on-exit",
    ]
    return cmap(
        ("image", settings.image),
        ("user", "root"),
        ("network_mode", "host"),
        ("cap_add", cseq(["NET_ADMIN"], flow=True)),
        ("entrypoint", cseq([ENTRYPOINT], flow=True)),
        ("command", cseq(args)),
        ("volumes", cseq([f"{PUBLIC_VOLUME}:{PUBLIC_DIR}:ro"])),
        ("depends_on", cmap((CONTROL_PLANE, cmap(("condition", "service_healthy"))))),
        ("restart", "unless-stopped"),
        (GENERATED, marker("node")),
    )
