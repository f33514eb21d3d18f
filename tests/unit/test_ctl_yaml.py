"""`meshlet apply`'s YAML → validated documents (meshlet.manifest): what is accepted, how
each mistake is named, and a round-trip property over generated services."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlet.errors import InputError
from meshlet.manifest import (
    check_unique,
    dump_documents,
    load_documents,
    service_document,
    validate_document,
)
from meshlet.model import Protocol, Service, ServicePort
from meshlet.policy import (
    Balancing,
    CircuitBreaker,
    HeaderMatch,
    LbAlgorithm,
    OutlierDetection,
    Policy,
    RetryBudget,
    RetryPolicy,
    Route,
    RouteMatch,
    Timeouts,
    WeightedBackend,
)

TWO = """\
kind: Service
namespace: shop
name: orders
ports:
  - {port: 8080, protocol: http}
policy:
  retries: {attempts: 2}
  routes:
    - name: canary
      backends:
        - {labels: {version: v1}, weight: 90}
        - {labels: {version: v2}, weight: 10}
---
---
kind: Service
namespace: shop
name: web
ports: [{port: 80}]
policy:
"""


def test_a_multi_document_file_becomes_validated_services() -> None:
    docs = load_documents(TWO, source="shop.yaml")
    assert [(d.index, d.ref) for d in docs] == [(1, "service/shop/orders"), (3, "service/shop/web")]
    orders, web = docs[0].service, docs[1].service
    assert orders.ports == (ServicePort(port=8080, protocol=Protocol.HTTP),)
    assert orders.policy.retries.attempts == 2
    assert orders.policy.retries.on_statuses == (502, 503, 504)  # defaults fill the rest
    assert [b.weight for b in orders.policy.routes[0].backends] == [90, 10]
    assert web.policy == Policy()  # `policy:` with nothing under it is the default policy
    assert docs[0].path == "/v1/services/shop/orders"
    body = docs[0].body()
    assert set(body) == {"ports", "policy"}
    assert body["policy"]["circuit_breaker"]["max_requests"] == 1024  # canonical and complete


def doc(extra: str = "", **replace: str) -> str:
    text = "kind: Service\nnamespace: shop\nname: orders\nports: [{port: 8080}]\n" + extra
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (doc("colour: blue\n"), "f.yaml: document 1: unknown field(s) colour"),
        (doc("vip: 198.19.128.9\n"), "VIPs are allocated by the control plane"),
        (doc("policy: {retries: {atempts: 2}}\n"), "policy.retries.atempts: unknown field"),
        (doc("policy: {timeouts: {connect_s: 0}}\n"), "timeouts.connect_s must be greater than 0"),
        (doc(Service="Deployment"), "document 1: kind 'Deployment' is not supported"),
        (doc(Service="service"), "(kinds are case-sensitive)"),
        (doc(**{"kind: Service\n": ""}), "document 1: kind: required field is missing"),
        (doc(**{"name: orders\n": ""}), "document 1: name: required field is missing"),
        (doc(**{"8080": "0"}), "document 1 (shop/orders): ports.0: port 0 is out of range"),
        (doc(**{"8080": "http"}), "ports.0.port:"),
        (doc(**{"shop": "Shop"}), "namespace 'Shop' is not a DNS label"),
        (doc("policy: {routes: [{name: a, backends: [{labels: {v: 1}}]}]}\n"), "quote it"),
        (doc("policy: {retries: [\n"), "f.yaml: not valid YAML at line 6"),
        (doc("name: again\n"), 'found duplicate key "name"'),
        ("- kind: Service\n", "f.yaml: document 1 is a list, not a mapping"),
        ("just text\n", "document 1 is str 'just text'"),
        (doc() + "---\n" + doc(**{"8080": "-1"}), "document 2 (shop/orders): ports.0"),
        ("# nothing here\n---\n", "f.yaml holds no documents"),
    ],
)
def test_each_mistake_is_named_on_one_line(text: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        load_documents(text, source="f.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_same_service_twice_is_refused_across_files() -> None:
    docs = load_documents(doc(), source="a.yaml") + load_documents(doc(), source="b.yaml")
    with pytest.raises(InputError, match=r"b.yaml: document 1 declares service/shop/orders again"):
        check_unique(docs)


def test_validate_document_needs_no_yaml() -> None:
    data = {"kind": "Service", "namespace": "a", "name": "b", "ports": [{"port": 1}]}
    assert validate_document(data, source="-", index=7).index == 7


# ---- round trip ----------------------------------------------------------------------------------

dns_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
label_key = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,8}[A-Za-z0-9])?", fullmatch=True)
label_value = st.from_regex(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,8}[A-Za-z0-9])?)?", fullmatch=True)
header_name = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
seconds = st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False)
maybe_seconds = st.none() | seconds
labels = st.dictionaries(label_key, label_value, max_size=3)


@st.composite
def balancings(draw: st.DrawFn) -> Balancing:
    algorithm = draw(st.sampled_from(LbAlgorithm))
    needs = algorithm is LbAlgorithm.RING_HASH
    header = draw(header_name if needs else st.none() | header_name)
    return Balancing(algorithm=algorithm, hash_header=header)


@st.composite
def retry_policies(draw: st.DrawFn) -> RetryPolicy:
    base = draw(seconds)
    return RetryPolicy(
        attempts=draw(st.integers(1, 10)),
        on_statuses=tuple(draw(st.lists(st.integers(100, 599), max_size=4))),
        on_grpc=tuple(draw(st.lists(st.sampled_from(["unavailable", "internal", "aborted"])))),
        on_connect_failure=draw(st.booleans()),
        on_reset=draw(st.booleans()),
        non_idempotent=draw(st.booleans()),
        per_try_timeout_s=draw(maybe_seconds),
        backoff_base_s=base,
        backoff_max_s=base + draw(st.floats(0, 100)),
        max_body_bytes=draw(st.integers(0, 1 << 30)),
        budget=RetryBudget(
            percent=draw(st.floats(0, 100)),
            min_per_s=draw(st.floats(0, 1000)),
            window_s=draw(seconds),
        ),
    )


def header_matches() -> st.SearchStrategy[HeaderMatch]:
    return st.one_of(
        st.builds(HeaderMatch, name=header_name, exact=st.text(max_size=12)),
        st.builds(HeaderMatch, name=header_name, prefix=st.text(max_size=12)),
        st.builds(HeaderMatch, name=header_name, present=st.booleans()),
    )


@st.composite
def routes(draw: st.DrawFn, name: str) -> Route:
    path = draw(st.none() | st.text(max_size=10).map(lambda p: "/" + p))
    exact = draw(st.booleans())
    backends = draw(
        st.lists(
            st.builds(WeightedBackend, labels=labels, weight=st.integers(1, 10000)), max_size=3
        )
    )
    return Route(
        name=name,
        match=RouteMatch(
            path_prefix=None if exact else path,
            path_exact=path if exact else None,
            methods=tuple(draw(st.lists(st.sampled_from(["GET", "POST", "PUT"]), max_size=2))),
            headers=tuple(draw(st.lists(header_matches(), max_size=2))),
        ),
        backends=tuple(backends),
        timeout_s=draw(maybe_seconds),
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    names = draw(st.lists(dns_label, max_size=3, unique=True))
    callers = st.lists(
        st.one_of(
            st.tuples(dns_label, dns_label).map("/".join),
            dns_label.map(lambda ns: f"{ns}/*"),
            st.tuples(dns_label, dns_label).map(
                lambda t: f"spiffe://mesh.local/ns/{t[0]}/sa/{t[1]}"
            ),
        ),
        max_size=3,
    ).map(tuple)
    return Policy(
        balancing=draw(balancings()),
        timeouts=Timeouts(
            connect_s=draw(seconds), request_s=draw(maybe_seconds), idle_s=draw(seconds)
        ),
        retries=draw(retry_policies()),
        circuit_breaker=CircuitBreaker(
            max_connections=draw(st.integers(1, 100000)),
            max_pending=draw(st.integers(1, 100000)),
            max_requests=draw(st.integers(1, 100000)),
        ),
        outlier_detection=OutlierDetection(
            consecutive_failures=draw(st.integers(1, 100)),
            base_ejection_s=draw(seconds),
            max_ejection_percent=draw(st.integers(0, 100)),
            panic_threshold_percent=draw(st.integers(0, 100)),
        ),
        routes=tuple(draw(routes(name)) for name in names),
        allowed_callers=draw(st.none() | callers),
    )


@st.composite
def services(draw: st.DrawFn) -> Service:
    numbers = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=4, unique=True))
    return Service(
        namespace=draw(dns_label),
        name=draw(dns_label),
        ports=tuple(ServicePort(port=n, protocol=draw(st.sampled_from(Protocol))) for n in numbers),
        policy=draw(policies()),
    )


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(services(), min_size=1, max_size=3, unique_by=lambda s: s.key))
def test_any_valid_service_round_trips_through_yaml(given_services: list[Service]) -> None:
    text = dump_documents([service_document(s) for s in given_services])
    docs = load_documents(text, source="gen.yaml")
    assert [d.service for d in docs] == given_services
    assert [d.index for d in docs] == list(range(1, len(given_services) + 1))
    check_unique(docs)
    # …and what apply sends is what the service is.
    for d, s in zip(docs, given_services, strict=True):
        again = validate_document(
            {"kind": "Service", "namespace": s.namespace, "name": s.name, **d.body()},
            source="body",
            index=1,
        )
        assert again.service == s
