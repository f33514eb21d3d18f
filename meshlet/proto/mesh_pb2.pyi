from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Object(_message.Message):
    __slots__ = ("kind", "key", "json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    key: str
    json: bytes
    def __init__(self, kind: _Optional[str] = ..., key: _Optional[str] = ..., json: _Optional[bytes] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("client_id", "kind", "since_revision", "spiffe_id", "bundle_fingerprint", "leaf_serial", "leaf_not_after", "leaf_chain_pem")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEAF_SERIAL_FIELD_NUMBER: _ClassVar[int]
    LEAF_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    LEAF_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    kind: str
    since_revision: int
    spiffe_id: str
    bundle_fingerprint: str
    leaf_serial: str
    leaf_not_after: int
    leaf_chain_pem: bytes
    def __init__(self, client_id: _Optional[str] = ..., kind: _Optional[str] = ..., since_revision: _Optional[int] = ..., spiffe_id: _Optional[str] = ..., bundle_fingerprint: _Optional[str] = ..., leaf_serial: _Optional[str] = ..., leaf_not_after: _Optional[int] = ..., leaf_chain_pem: _Optional[bytes] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("objects",)
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[Object]
    def __init__(self, objects: _Optional[_Iterable[_Union[Object, _Mapping]]] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("type", "object")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[Change.Type]
        ADDED: _ClassVar[Change.Type]
        MODIFIED: _ClassVar[Change.Type]
        DELETED: _ClassVar[Change.Type]
    TYPE_UNSPECIFIED: Change.Type
    ADDED: Change.Type
    MODIFIED: Change.Type
    DELETED: Change.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    type: Change.Type
    object: Object
    def __init__(self, type: _Optional[_Union[Change.Type, str]] = ..., object: _Optional[_Union[Object, _Mapping]] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    def __init__(self, changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ...) -> None: ...

class Bookmark(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("revision", "snapshot", "delta", "bookmark", "trust_bundle_pem")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    BOOKMARK_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    revision: int
    snapshot: Snapshot
    delta: Delta
    bookmark: Bookmark
    trust_bundle_pem: bytes
    def __init__(self, revision: _Optional[int] = ..., snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., delta: _Optional[_Union[Delta, _Mapping]] = ..., bookmark: _Optional[_Union[Bookmark, _Mapping]] = ..., trust_bundle_pem: _Optional[bytes] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SignRequest(_message.Message):
    __slots__ = ("csr_pem", "spiffe_id", "join_token", "ttl_seconds")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    spiffe_id: str
    join_token: str
    ttl_seconds: int
    def __init__(self, csr_pem: _Optional[bytes] = ..., spiffe_id: _Optional[str] = ..., join_token: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("cert_chain_pem", "trust_bundle_pem")
    CERT_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    cert_chain_pem: bytes
    trust_bundle_pem: bytes
    def __init__(self, cert_chain_pem: _Optional[bytes] = ..., trust_bundle_pem: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("endpoint_json", "service_ports_json")
    ENDPOINT_JSON_FIELD_NUMBER: _ClassVar[int]
    SERVICE_PORTS_JSON_FIELD_NUMBER: _ClassVar[int]
    endpoint_json: bytes
    service_ports_json: bytes
    def __init__(self, endpoint_json: _Optional[bytes] = ..., service_ports_json: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("endpoint_json", "revision", "created")
    ENDPOINT_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    endpoint_json: bytes
    revision: int
    created: bool
    def __init__(self, endpoint_json: _Optional[bytes] = ..., revision: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("id", "health", "revision")
    ID_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    id: str
    health: str
    revision: int
    def __init__(self, id: _Optional[str] = ..., health: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class SetHealthRequest(_message.Message):
    __slots__ = ("id", "health")
    ID_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    id: str
    health: str
    def __init__(self, id: _Optional[str] = ..., health: _Optional[str] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("name", "underlay_address", "vtep_mac")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UNDERLAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VTEP_MAC_FIELD_NUMBER: _ClassVar[int]
    name: str
    underlay_address: str
    vtep_mac: str
    def __init__(self, name: _Optional[str] = ..., underlay_address: _Optional[str] = ..., vtep_mac: _Optional[str] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("node_json", "revision", "created")
    NODE_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    node_json: bytes
    revision: int
    created: bool
    def __init__(self, node_json: _Optional[bytes] = ..., revision: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class NodeHeartbeatRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class NodeHeartbeatResponse(_message.Message):
    __slots__ = ("name", "health", "revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    health: str
    revision: int
    def __init__(self, name: _Optional[str] = ..., health: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class DeregisterNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeregisterNodeResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...
