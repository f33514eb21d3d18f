"""Declarative YAML for `meshlet apply`: text → validated service documents, and back.

A file holds one or more YAML documents (separated by ``---``), each one service::

    kind: Service
    namespace: shop
    name: orders
    ports: [{port: 8080, protocol: http}]
    policy: {retries: {attempts: 2}}        # optional; omitted fields take the defaults

Every document is validated (kind, fields, the whole service with its policy through
``meshlet.wire``) before anything is sent, so one bad document stops the whole apply.
Errors name the source, the document's position (1-based, counting every ``---``) and
the field. Pure: no files, no network; the CLI reads the text. pydantic (via
``meshlet.wire``) and ruamel.yaml are imported on use, so `meshlet get` stays quick.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

from meshlet.errors import InputError
from meshlet.model import Service

KIND = "Service"
FIELDS = ("kind", "namespace", "name", "ports", "policy")
_HINTS = {
    "vip": "VIPs are allocated by the control plane",
    "endpoints": "endpoints register themselves (sidecars) or via POST /v1/endpoints",
    "apiVersion": "meshlet documents have no apiVersion",
    "metadata": "put namespace and name at the top level",
    "spec": "put ports and policy at the top level",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceDocument:
    """One validated document: where it came from and the service it declares."""

    source: str
    index: int  # 1-based position in its file
    service: Service

    @property
    def ref(self) -> str:
        return f"service/{self.service.key}"

    @property
    def path(self) -> str:
        return f"/v1/services/{self.service.namespace}/{self.service.name}"

    def body(self) -> dict[str, Any]:
        """The PUT body: the validated (canonical) ports and policy."""
        from meshlet import wire

        data = wire.to_data(self.service)
        return {"ports": data["ports"], "policy": data["policy"]}


@functools.cache
def _representer() -> type:
    from ruamel.yaml.representer import SafeRepresenter

    class Representer(SafeRepresenter):
        """Double-quotes strings holding NEL/LS/PS: ruamel writes them raw, then reads
        them back as line breaks (found by the round-trip property test)."""

    def represent_str(rep: Any, data: str) -> Any:
        style = '"' if any(c in data for c in "\x85\u2028\u2029") else None
        return rep.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Representer.add_representer(str, represent_str)
    return Representer


def _yaml() -> Any:
    from ruamel.yaml import YAML  # imported on use: `meshlet get` never needs it

    yaml = YAML(typ="safe", pure=True)
    yaml.Representer = _representer()
    yaml.default_flow_style = False
    return yaml


def parse_yaml(text: str, *, source: str) -> list[Any]:
    """Every document of ``text`` (``None`` for empty ones), or one InputError with the line."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return list(_yaml().load_all(text))
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = (e.problem or e.context or "malformed").strip()
        raise InputError(f"{source}: not valid YAML{where}: {problem}") from None
    except YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{source}: not valid YAML: {first}") from None


def validate_document(data: Any, *, source: str, index: int) -> ServiceDocument:
    """One parsed document → a ServiceDocument, or an InputError naming the field."""
    where = f"{source}: document {index}"
    if not isinstance(data, dict):
        got = "a list" if isinstance(data, list) else f"{type(data).__name__} {data!r}"
        raise InputError(f"{where} is {got}, not a mapping like {{kind: Service, name: ...}}")
    if "kind" not in data:
        raise InputError(f"{where}: kind: required field is missing (kind: Service)")
    kind = data["kind"]
    if kind != KIND:
        hint = " (kinds are case-sensitive)" if str(kind).lower() == KIND.lower() else ""
        raise InputError(f"{where}: kind {kind!r} is not supported{hint}: the only kind is Service")
    unknown = [str(k) for k in data if k not in FIELDS]
    if unknown:
        hints = "; ".join(_HINTS[k] for k in unknown if k in _HINTS)
        raise InputError(
            f"{where}: unknown field(s) {', '.join(unknown)}: a Service document takes "
            f"{', '.join(FIELDS)}" + (f" ({hints})" if hints else "")
        )
    for required in ("namespace", "name", "ports"):
        if required not in data:
            raise InputError(f"{where}: {required}: required field is missing")
    named = f"{where} ({data['namespace']}/{data['name']})"
    if data.get("policy") is None:  # `policy:` with nothing under it means the defaults
        data = {**data, "policy": {}}
    fields = {k: data[k] for k in ("namespace", "name", "ports", "policy")}
    from meshlet import wire

    try:
        service = wire.from_data(Service, fields, what=named)
    except InputError as e:
        # wire names whole-object errors "body"; here the object is the document.
        message = str(e).replace(f"{named}: body: ", f"{named}: ")
        if "valid string" in message:
            message += " (YAML read a number or true/false there: quote it)"
        raise InputError(message) from None
    return ServiceDocument(source=source, index=index, service=service)


def load_documents(text: str, *, source: str) -> list[ServiceDocument]:
    """All documents of one file, validated; empty documents are skipped."""
    docs = [
        validate_document(data, source=source, index=i)
        for i, data in enumerate(parse_yaml(text, source=source), start=1)
        if data is not None
    ]
    if not docs:
        raise InputError(f"{source} holds no documents: expected at least one `kind: Service`")
    return docs


def check_unique(docs: list[ServiceDocument]) -> None:
    """Refuse two documents for the same service (the second would silently win)."""
    seen: dict[str, ServiceDocument] = {}
    for doc in docs:
        first = seen.setdefault(doc.service.key, doc)
        if first is not doc:
            raise InputError(
                f"{doc.source}: document {doc.index} declares {doc.ref} again (first in "
                f"{first.source}: document {first.index}): keep one of them"
            )


def service_document(service: Service) -> dict[str, Any]:
    """The document that declares ``service`` (its VIP left out: the control plane owns it)."""
    from meshlet import wire

    data = wire.to_data(service)
    return {
        "kind": KIND,
        "namespace": service.namespace,
        "name": service.name,
        "ports": data["ports"],
        "policy": data["policy"],
    }


def dump_documents(documents: list[Any]) -> str:
    """YAML text with one document per item, separated by ``---``."""
    out = io.StringIO()
    _yaml().dump_all(documents, out)
    return out.getvalue()


def yaml_text(data: Any) -> str:
    """Plain data (e.g. the API's JSON) as block-style YAML."""
    out = io.StringIO()
    _yaml().dump(data, out)
    return out.getvalue()
