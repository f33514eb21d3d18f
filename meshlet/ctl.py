"""`meshlet get|describe|apply|delete`: the operator's CLI over the control plane's admin API.

Each command talks to the admin REST API through ``meshlet.apiclient``; it holds no
state and decides nothing the server would decide. The address and token come from
flags or the environment: --server / MESHLET_SERVER (default http://127.0.0.1:15080,
HOST:PORT works too), --token / MESHLET_TOKEN, --token-file / MESHLET_TOKEN_FILE,
--timeout / MESHLET_TIMEOUT. A flag beats the environment.

Exit codes (every failure is one line on stderr, ``meshlet: error: ...``):

    0  success
    1  refused or failed: the control plane could not be reached, refused the admin
       token (401), refused the change (409 conflict) or failed (5xx)
    2  bad input, nothing was changed: a usage error, a file that is missing or is not
       valid YAML, a document that does not validate, a service that does not exist

`apply` validates every document of every file before it sends anything.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from meshlet.apiclient import DEFAULT_SERVER, ApiClient, AuthError, UnreachableError
from meshlet.errors import InputError, MeshError, NotFoundError

EXIT_CODES_EPILOG = """\b
Exit codes:
  0  success
  1  refused or failed: control plane unreachable, admin token refused (401),
     change refused (409) or server error
  2  bad input, nothing changed: usage, missing or malformed file, invalid
     document, no such service

\b
Environment: MESHLET_SERVER, MESHLET_TOKEN, MESHLET_TOKEN_FILE, MESHLET_TIMEOUT
(a flag beats the environment)."""

KINDS = {
    "services": ("service", "services", "svc"),
    "endpoints": ("endpoint", "endpoints", "ep"),
    "nodes": ("node", "nodes"),
    "vips": ("vip", "vips"),
}
OUTPUT = click.Choice(["table", "json", "yaml"], case_sensitive=False)
RESULT_WORDS = {"created": "created", "updated": "configured", "unchanged": "unchanged"}
CONTEXT = {"help_option_names": ["-h", "--help"]}


# ---- connection -------------------------------------------------------------------------------


def read_token_file(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except FileNotFoundError:
        raise NotFoundError(f"token file {path} does not exist: check --token-file") from None
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not text"
        raise InputError(f"cannot read token file {path}: {why}") from None
    if not token:
        raise InputError(f"token file {path} is empty: it should hold the admin token")
    return token


def resolve_token(ctx: click.Context, token: str | None, token_file: str | None) -> str | None:
    """--token or --token-file; a flag beats the environment, two at one level is an error."""
    if token and token_file:
        src = ctx.get_parameter_source
        explicit = click.core.ParameterSource.COMMANDLINE
        from_flag = (src("token") == explicit, src("token_file") == explicit)
        if from_flag == (True, False):
            token_file = None
        elif from_flag == (False, True):
            token = None
        else:
            where = "flags" if all(from_flag) else "MESHLET_TOKEN and MESHLET_TOKEN_FILE"
            raise InputError(f"both {where} give a token: use one of them")
    if token_file:
        return read_token_file(token_file)
    return token.strip() if token else None


def with_client(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --server/--token/--token-file/--timeout and hand the command an ApiClient."""

    @functools.wraps(f)
    def wrapper(
        server: str, token: str | None, token_file: str | None, timeout: str, **kwargs: Any
    ) -> Any:
        from meshlet.durations import parse_duration

        ctx = click.get_current_context()
        client = ApiClient(
            server,
            resolve_token(ctx, token, token_file),
            timeout_s=parse_duration(timeout, what="--timeout"),
        )
        return f(client, **kwargs)

    options = [
        click.option(
            "--server",
            envvar="MESHLET_SERVER",
            default=DEFAULT_SERVER,
            show_default=True,
            metavar="URL",
            help="The control plane's admin API (URL or HOST:PORT).",
        ),
        click.option("--token", envvar="MESHLET_TOKEN", help="Admin token."),
        click.option(
            "--token-file",
            envvar="MESHLET_TOKEN_FILE",
            metavar="PATH",
            help="File holding the admin token (DATA_DIR/admin-token).",
        ),
        click.option(
            "--timeout",
            envvar="MESHLET_TIMEOUT",
            default="10s",
            show_default=True,
            help="Give up on a request after this long.",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


# ---- helpers -------------------------------------------------------------------------------------


def kind_of(value: str, allowed: tuple[str, ...]) -> str:
    for kind, names in KINDS.items():
        if value.lower() in names and kind in allowed:
            return kind
    raise click.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint="KIND")


def service_ref(text: str) -> tuple[str, str]:
    from meshlet.model import check_dns_label

    namespace, sep, name = text.removeprefix("service/").partition("/")
    if not sep or not namespace or not name:
        raise InputError(f"service {text!r} must be NAMESPACE/NAME, like shop/orders")
    try:
        check_dns_label(namespace, "namespace")
        check_dns_label(name, "service name")
    except ValueError as e:
        raise InputError(str(e)) from None
    return namespace, name


def emit(data: Any, output: str) -> None:
    from meshlet.manifest import yaml_text

    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(yaml_text(data), nl=False)


def _in_namespace(item: dict[str, Any], kind: str, namespace: str) -> bool:
    if kind == "vips":
        return str(item["service"]).split("/", 1)[0] == namespace
    return bool(item.get("namespace") == namespace)


# ---- commands ------------------------------------------------------------------------------------


@click.command(epilog=EXIT_CODES_EPILOG, context_settings=CONTEXT)
@click.argument("kind", metavar="KIND")
@click.option("-o", "--output", type=OUTPUT, default="table", show_default=True)
@click.option("-n", "--namespace", help="Only this namespace (services, endpoints, vips).")
@with_client
def get(client: ApiClient, kind: str, output: str, namespace: str | None) -> None:
    """List services, endpoints, nodes or vips (KIND).

    -o json and -o yaml print the API's answer ({revision, items}); the table shows
    ENDPOINTS as healthy/total.
    """
    from meshlet import ctl_render as render

    kind = kind_of(kind, tuple(KINDS))
    output = output.lower()
    if namespace and kind == "nodes":
        raise InputError("nodes have no namespace: drop -n/--namespace")
    if kind == "services" and output == "table":
        snap = client.get("/v1/snapshot").data  # services and endpoints at one revision
        data = {"revision": snap["revision"], "items": snap["services"]}
        endpoints = snap["endpoints"]
    else:
        data = client.get(f"/v1/{kind}").data
        endpoints = []
    if namespace:
        data["items"] = [i for i in data["items"] if _in_namespace(i, kind, namespace)]
    if output != "table":
        emit(data, output)
        return
    items = data["items"]
    if not items:
        where = f" in namespace {namespace}" if namespace else ""
        click.echo(f"no {kind}{where}", err=True)
        return
    columns: Sequence[str]
    rows: list[Sequence[str]]
    if kind == "services":
        columns, rows = render.SERVICE_COLUMNS, render.service_rows(items, endpoints)
    elif kind == "endpoints":
        columns, rows = render.ENDPOINT_COLUMNS, render.endpoint_rows(items)
    elif kind == "nodes":
        columns, rows = render.NODE_COLUMNS, render.node_rows(items)
    else:
        columns, rows = render.VIP_COLUMNS, render.vip_rows(items)
    render.print_table(columns, rows, sys.stdout)


@click.command(epilog=EXIT_CODES_EPILOG, context_settings=CONTEXT)
@click.argument("kind", metavar="service")
@click.argument("ref", metavar="NAMESPACE/NAME")
@click.option("-o", "--output", type=OUTPUT, default="table", show_default=True)
@with_client
def describe(client: ApiClient, kind: str, ref: str, output: str) -> None:
    """Show a service: its VIP, ports, effective policy (defaults included) and endpoints."""
    from meshlet import ctl_render as render

    kind_of(kind, ("services",))
    namespace, name = service_ref(ref)
    path = f"/v1/services/{namespace}/{name}"
    service = client.get(path).data
    endpoints = client.get(path + "/endpoints").data["items"]
    if output.lower() == "table":
        click.echo(render.describe_service(service, endpoints), nl=False)
    else:
        emit({"service": service, "endpoints": endpoints}, output.lower())


def read_source(path: str) -> tuple[str, str]:
    """(name for messages, text) of a -f argument; ``-`` is stdin."""
    if path == "-":
        return "<stdin>", sys.stdin.read()
    try:
        return path, Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist: check -f") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory: pass a YAML file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text: pass a YAML file") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None


@click.command(epilog=EXIT_CODES_EPILOG, context_settings=CONTEXT)
@click.option(
    "-f",
    "--filename",
    "files",
    multiple=True,
    required=True,
    metavar="FILE",
    help="YAML with one `kind: Service` per document ('-' reads stdin); repeatable.",
)
@with_client
def apply(client: ApiClient, files: tuple[str, ...]) -> None:
    """Create or update services (with their policy) to match YAML files.

    Every document of every file is validated first: if one is bad, nothing is sent.
    Each service then prints created, configured or unchanged; applying the same
    files again changes nothing.

    \b
      kind: Service
      namespace: shop
      name: orders
      ports: [{port: 8080, protocol: http}]
      policy:
        retries: {attempts: 2}
        routes:
          - name: canary
            backends:
              - {labels: {version: v1}, weight: 90}
              - {labels: {version: v2}, weight: 10}
    """
    from meshlet import manifest

    docs = []
    for path in files:
        source, text = read_source(path)
        docs.extend(manifest.load_documents(text, source=source))
    manifest.check_unique(docs)
    for done, doc in enumerate(docs):
        try:
            resp = client.put(doc.path, doc.body())
        except (AuthError, UnreachableError) as e:  # not about the document: say it plainly
            if not done:
                raise
            cls: type[MeshError] = type(e)
            raise cls(f"{e} ({done} earlier document(s) were applied)") from None
        except MeshError as e:  # about this document: say which one
            applied = f" ({done} earlier document(s) were applied)" if done else ""
            raise type(e)(f"{doc.source}: document {doc.index} ({doc.ref}): {e}{applied}") from None
        result = resp.headers.get("X-Mesh-Result") or (
            "created" if resp.status == 201 else "updated"
        )
        click.echo(f"{doc.ref} {RESULT_WORDS.get(result, result)}")


@click.command(epilog=EXIT_CODES_EPILOG, context_settings=CONTEXT)
@click.argument("kind", metavar="service")
@click.argument("ref", metavar="NAMESPACE/NAME")
@click.option("--ignore-not-found", is_flag=True, help="Succeed when the service does not exist.")
@with_client
def delete(client: ApiClient, kind: str, ref: str, ignore_not_found: bool) -> None:
    """Delete a service, its VIP and its endpoints."""
    kind_of(kind, ("services",))
    namespace, name = service_ref(ref)
    try:
        data = client.delete(f"/v1/services/{namespace}/{name}").data
    except NotFoundError:
        if ignore_not_found:
            return
        raise NotFoundError(
            f"service {namespace}/{name} does not exist (--ignore-not-found makes this succeed)"
        ) from None
    deleted = [str(d) for d in (data or {}).get("deleted", [])]
    own = f"service/{namespace}/{name}"
    for ref_ in [own, *(d for d in deleted if d != own)]:
        click.echo(f"{ref_} deleted")
