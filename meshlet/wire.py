"""The wire shape of the model: JSON in, validated frozen objects out, and back.

Validation errors become one ``InputError`` that names each bad field and why, e.g.
``ports.0.port: port 0 is out of range 1-65535``. Unknown fields are refused.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError

from meshlet.errors import InputError
from meshlet.model import Endpoint, Kind, Node, Object, Service
from meshlet.policy import Policy

T = TypeVar("T")

_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {
    cls: TypeAdapter(cls) for cls in (Service, Endpoint, Node, Policy)
}
KIND_TYPES: dict[Kind, type[Object]] = {
    Kind.SERVICE: Service,
    Kind.ENDPOINT: Endpoint,
    Kind.NODE: Node,
}


def adapter(cls: type[T]) -> TypeAdapter[T]:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def describe_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def from_data(cls: type[T], data: Any, *, what: str = "") -> T:
    """Validate plain data (parsed JSON/YAML) into ``cls``; InputError names the bad fields."""
    try:
        return adapter(cls).validate_python(data)
    except ValidationError as e:
        prefix = f"{what}: " if what else ""
        raise InputError(prefix + describe_validation_error(e)) from None
    except ValueError as e:  # raised by a __post_init__ outside pydantic's wrapping
        raise InputError(f"{what}: {e}" if what else str(e)) from None


def to_data(obj: Any) -> Any:
    return adapter(type(obj)).dump_python(obj, mode="json")


def encode(obj: Any) -> bytes:
    return orjson.dumps(to_data(obj))


def decode(cls: type[T], raw: bytes | str, *, what: str = "") -> T:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InputError(f"{what or 'body'} is not valid JSON: {e}") from None
    return from_data(cls, data, what=what)


def json_schema(cls: type[Any]) -> dict[str, Any]:
    return adapter(cls).json_schema(ref_template="#/components/schemas/{model}")
