"""`meshlet inject` / `meshlet uninject`: put a docker compose file's services in the mesh,
and take them out again. Pure: YAML text in, YAML text and a report out.

For: compose/cli.py (which reads and writes the files). Must never: read files, look at
the environment, print, or change a user's service beyond what is listed below.

What inject writes (a contract: the meshlet image and compose/examples rely on it)
------------------------------------------------------------------------------------
For each app service ``svc`` that is not skipped, with ``NS`` the project name given
to inject (the mesh namespace: identity ``spiffe://<trust-domain>/ns/NS/sa/<svc>``):

``svc`` (the app) gets ``network_mode: "service:svc-meshlet"`` and ``depends_on``
    ``svc-meshlet-init: {condition: service_completed_successfully}`` and
    ``svc-meshlet: {condition: service_healthy}``, first (a list-form ``depends_on``
    becomes the map form, its entries ``service_started``). Its ``ports``, ``expose``,
    ``networks``, ``hostname``, ``dns``, ``dns_search``, ``dns_opt``, ``extra_hosts``,
    ``links``, ``external_links`` and ``mac_address`` move to the sidecar (Docker
    refuses them on a container that joins another's network). The rest stays.
``svc-meshlet`` (the sidecar) owns the network namespace: the image (``--image``,
    default ``meshlet:latest``), ``user: "1337:1337"``, ``cap_drop: [ALL]``,
    ``entrypoint: [meshlet]``, ``command: [sidecar, run, --service, NS/svc, --mode,
    transparent, --control-plane, "meshlet-control-plane:15010", --control-plane-mtls,
    "meshlet-control-plane:15012", --address, auto, --ca-bundle, ..., --join-token,
    ..., (--app-port, PORT, (--app-protocol, P,)) --dns, "127.0.0.53:15053", --admin,
    "127.0.0.1:15000", --node, "${MESHLET_NODE:-node1}", (--label, k=v, ...)]``; the
    moved settings; on each of the app's networks (``default`` when it named none) the
    alias ``svc``, so containers still reach ``svc`` by name. It mounts only the volume
    ``meshlet-public`` read-only at /var/lib/meshlet-public (``bundle.pem``,
    ``join-token``: never ``meshlet-data``, which holds the CA's keys and the admin
    token) and keeps its key in /var/lib/meshlet/NS-svc (the image lets uid 1337 write
    /var/lib/meshlet). Its healthcheck (python3 + urllib: the image has no
    curl) reads ``/ready`` on the admin port and passes once the certificate and the
    mesh map are there, whether or not the app accepts yet: the app starts only after
    it passes. It depends on ``meshlet-control-plane`` (healthy). Its last keys are
    ``x-meshlet-generated: {role: sidecar, app: svc}`` and ``x-meshlet-original`` (what
    uninject needs: the app's key order, and its ``networks``/``depends_on`` where
    inject rewrote them).
``svc-meshlet-init`` joins the sidecar's namespace (``network_mode:
    "service:svc-meshlet"``) as ``user: root`` with ``cap_drop: [ALL]`` and ``cap_add:
    [NET_ADMIN]``, runs ``meshlet sidecar init --outbound-port 15001 --inbound-port 15006
    --dns 127.0.0.53:15053 --proxy-uid 1337 [--exclude-ports P,...]`` and exits 0. Only
    the inits (and the node helper) have NET_ADMIN.
``x-meshlet.replicas: N`` adds ``svc-2`` ... ``svc-N`` (copies of the app, marked
    ``x-meshlet-generated: {role: replica, ...}``), each with its own ``-meshlet`` and
    ``-meshlet-init``: compose joins every container of a scaled service to the *first*
    container of ``service:X``, so ``scale``/``deploy.replicas`` cannot give each
    replica its sidecar (a service that sets them above 1 is refused). Copies get the
    app's networks (with the alias ``svc``), DNS settings and links, not its published
    ports, ``expose`` or ``hostname``.
Added once, unless the file has a service of that name: ``meshlet-control-plane``
    (``meshlet control-plane run --data-dir /var/lib/meshlet --api 0.0.0.0:15080 --grpc
    0.0.0.0:15010 --grpc-mtls 0.0.0.0:15012 --public-dir /var/lib/meshlet-public
    --trust-domain TD`` as 1337:1337, volumes ``meshlet-data`` at /var/lib/meshlet and
    ``meshlet-public`` at /var/lib/meshlet-public, on ``default``, every sidecar's networks and
    ``meshlet``; healthcheck on /readyz; gRPC port 15010 published on 127.0.0.1 for the
    node helper) and ``meshlet-node`` (``network_mode: host``, ``cap_add: [NET_ADMIN]``,
    ``meshlet node run --name ${MESHLET_NODE:-node1} --control-plane 127.0.0.1:15010
    --ca-bundle ... --join-token ... --underlay-address
    ${MESHLET_UNDERLAY_ADDRESS:-127.0.0.1} --teardown-on-exit``, ``meshlet-public``
    read-only like a sidecar; ``--no-node`` leaves it out). A control plane of the user's
    own must mount ``meshlet-public`` there and run with that ``--public-dir``. Top level:
    the volumes ``meshlet-data`` and ``meshlet-public`` (a tmpfs, ``driver_opts`` ``o:
    uid=1337,gid=1337,mode=0755``: the image has no directory there that 1337 owns, and
    its two files are rewritten at every start) and the network ``meshlet`` (the
    control plane's, for tools outside the mesh that call its API), unless there, and
    ``x-meshlet-injected`` saying which of them inject added.
Generated services follow the user's, in the order of their apps.

Per service, ``x-meshlet:`` takes ``inject: false``, ``ports: [8080]``, ``protocol:
{8080: http}`` (auto, tcp, http, grpc; default: the sidecar detects), ``exclude-ports:
[5432]``, ``identity: NAME``, ``labels: {version: v2}``, ``replicas: N``. The app's ports
are ``x-meshlet.ports``, else the container side of ``expose`` and ``ports`` (TCP only),
less ``exclude-ports``; the sidecar serves the first (it takes one ``--app-port``).
``exclude-ports`` also bypass the sidecar outbound. ``identity`` is the mesh service
name and SPIFFE service account (default: the compose name). Skipped, with the reason
in the report: ``inject: false``, the meshlet services. A service with no TCP port (a
worker, a job, a load generator; or a server whose port only its image declares) is
injected *outbound only*: its sidecar runs without ``--app-port``, so it has an
identity and calls the mesh by name, but registers no endpoint; whatever the app serves
stays reachable as before, outside the mesh (inbound is never intercepted). Labels on
such a service are refused (they describe serving replicas). Known limitation: an
end-of-line comment after a one-line flow-style service (``web: {image: x}  # note``)
moves right after inject and uninject.
Refused (InputError; nothing is written): a service with ``network_mode`` (unless
``inject: false``), one whose moved keys or ``network_mode`` come from a merge key
(``<<``), a service that is an alias of another, a name inject needs that is taken,
unknown ``x-meshlet`` keys or values.

Inject uninjects first, so it is idempotent; uninject removes every service marked
``x-meshlet-generated`` and puts back what the first sidecar kept, so
uninject(inject(x)) is x byte for byte when x is in one consistent YAML style (the
indentation is guessed from x). Comments travel with the entries they follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ruamel.yaml.comments import CommentedMap

from compose import inject_build as build
from compose.inject_apply import (
    SERVICES_TAIL,
    TAIL,
    add_top_level,
    control_plane_networks,
    inject_app,
)
from compose.inject_comments import give_trailer, line_count, put_back, take_trailer
from compose.inject_plan import plan
from compose.inject_undo import uninject_tree
from compose.inject_yaml import load
from meshlet.errors import InputError


@dataclass(frozen=True, slots=True)
class Result:
    text: str
    report: tuple[str, ...]  # one line per service: "web: injected", "db: skipped (...)"
    changed: bool


def inject(text: str, *, source: str, settings: build.Settings) -> Result:
    """Add sidecars to every service that can have one (see the module docstring)."""
    doc = load(text, source=source)
    _check_root(doc.root, source=source)
    base = text
    if _is_injected(doc.root):
        uninject_tree(doc.root, indent=doc.indent)
        base = doc.dump()
        doc = load(base, source=source)
    root = doc.root
    _check_top_level(root, source=source)
    services = root["services"]
    report: list[str] = []
    plans = plan(root, source=source, report=report)
    if not plans:
        return Result(text=base, report=tuple(report), changed=base != text)
    cp_condition = _control_plane_condition(services)
    generated: list[tuple[str, CommentedMap]] = []
    for p in plans:
        generated += inject_app(services, p, settings, cp_condition=cp_condition, indent=doc.indent)
    if build.CONTROL_PLANE not in services:
        networks = control_plane_networks(generated)
        generated.append((build.CONTROL_PLANE, build.control_plane(settings, networks=networks)))
        report.append(f"{build.CONTROL_PLANE}: added")
    if settings.node and build.NODE not in services:
        generated.append((build.NODE, build.node(settings)))
        report.append(f"{build.NODE}: added")

    record = CommentedMap()
    trailer, handle = take_trailer(services)  # the lines after the last service move
    for name, service in generated:  # to after the last generated one
        services[name] = service
    if trailer and give_trailer(services, trailer):
        record[SERVICES_TAIL] = line_count(trailer)
    else:
        put_back(handle, trailer)

    trailer, handle = take_trailer(root)  # and the end of the file stays the end
    record.update(add_top_level(root))
    if trailer:
        record[TAIL] = line_count(trailer)
    root[build.INJECTED] = record
    if trailer and not give_trailer(root, trailer):
        del record[TAIL]
        put_back(handle, trailer)
    out = doc.dump()
    return Result(text=out, report=tuple(report), changed=out != text)


def uninject(text: str, *, source: str) -> Result:
    """Remove what inject added and put the apps' settings back."""
    doc = load(text, source=source)
    _check_root(doc.root, source=source)
    if not _is_injected(doc.root):
        return Result(text=text, report=("nothing to uninject",), changed=False)
    report = uninject_tree(doc.root, indent=doc.indent)
    out = doc.dump()
    return Result(text=out, report=tuple(report), changed=out != text)


def _check_root(root: Any, *, source: str) -> None:
    if root is None:
        raise InputError(f"{source} is empty: a compose file needs services:")
    if not isinstance(root, CommentedMap):
        got = "a list" if isinstance(root, list) else f"a {type(root).__name__}"
        raise InputError(f"{source}: the top level is {got}, not a mapping with services:")
    if "services" not in root:
        raise InputError(
            f"{source}: no services: key (compose file format 1 is not supported: "
            "put the services under services:)"
        )
    if not isinstance(root["services"], CommentedMap):
        raise InputError(f"{source}: services: must be a mapping of service names")


def _check_top_level(root: CommentedMap, *, source: str) -> None:
    for key in ("volumes", "networks"):
        if key in root and not isinstance(root[key], CommentedMap):
            raise InputError(
                f"{source}: top-level {key}: must be a mapping (write {key}: {{}} or remove it)"
            )


def _is_injected(root: CommentedMap) -> bool:
    services = root["services"]
    return build.INJECTED in root or any(
        isinstance(s, Mapping) and build.GENERATED in s for s in services.values()
    )


def _control_plane_condition(services: CommentedMap) -> str:
    """Sidecars wait for the control plane to be healthy, if it has a healthcheck."""
    mine = services.get(build.CONTROL_PLANE)
    if isinstance(mine, Mapping) and "healthcheck" not in mine:
        return "service_started"
    return "service_healthy"
