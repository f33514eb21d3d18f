"""L7 routing: which route a request takes (in order, first match wins) and how a
route's weighted, label-selected backends share the traffic."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshlet.model import Endpoint, Service, ServicePort
from meshlet.policy import HeaderMatch, Policy, Route, RouteMatch, WeightedBackend
from sidecar.routing import DEFAULT_ROUTE, RouteTable, strip_query

NO_HEADERS: dict[bytes, bytes] = {}


def service(*routes: Route) -> Service:
    return Service(
        namespace="shop",
        name="orders",
        ports=(ServicePort(port=8080),),
        policy=Policy(routes=routes),
    )


def endpoint(n: int, **labels: str) -> Endpoint:
    return Endpoint(
        id=f"orders-{n}",
        namespace="shop",
        service="orders",
        address=f"198.19.1.{n}",
        app_port=8080,
        labels=labels,
    )


def route(name: str, **match: object) -> Route:
    return Route(name=name, match=RouteMatch(**match))  # type: ignore[arg-type]


def split(*weights: tuple[str, int]) -> Route:
    return Route(
        name="split",
        backends=tuple(WeightedBackend(labels={"version": v}, weight=w) for v, w in weights),
    )


V1 = (endpoint(1, version="v1"), endpoint(2, version="v1"), endpoint(3, version="v1"))
V2 = (endpoint(4, version="v2"),)
ALL = V1 + V2


def ids(subset: tuple[Endpoint, ...]) -> tuple[str, ...]:
    """Endpoints are unhashable (their labels are a dict): count subsets by their ids."""
    return tuple(e.id for e in subset)


# -- matching -----------------------------------------------------------------------------


def test_a_service_without_routes_sends_every_request_to_every_endpoint() -> None:
    table = RouteTable.build(service())
    for method, path in [("GET", "/"), ("POST", "/x?y=1"), ("BREW", "*")]:
        assert table.match(method, path, NO_HEADERS) is DEFAULT_ROUTE
    assert table.select_backend(DEFAULT_ROUTE, ALL, random.Random(0)) is ALL


def test_routes_are_tried_in_order_and_the_first_match_wins() -> None:
    table = RouteTable.build(
        service(
            route("exact", path_exact="/api/health"),
            route("api", path_prefix="/api/"),
            route("health-later", path_exact="/api/health"),  # shadowed: never taken
            route("rest", path_prefix="/"),
        )
    )
    assert table.match("GET", "/api/health", NO_HEADERS).name == "exact"  # type: ignore[union-attr]
    assert table.match("GET", "/api/orders", NO_HEADERS).name == "api"  # type: ignore[union-attr]
    assert table.match("GET", "/static/a.css", NO_HEADERS).name == "rest"  # type: ignore[union-attr]


def test_no_matching_route_is_none_so_the_proxy_answers_404() -> None:
    table = RouteTable.build(service(route("api", path_prefix="/api/")))
    assert table.match("GET", "/other", NO_HEADERS) is None


def test_path_prefix_is_a_plain_string_prefix_as_in_envoy() -> None:
    table = RouteTable.build(service(route("api", path_prefix="/api")))
    for path in ["/api", "/api/", "/api/v1/x", "/apix"]:
        assert table.match("GET", path, NO_HEADERS) is not None, path
    for path in ["/ap", "/API", "/v1/api", "*"]:
        assert table.match("GET", path, NO_HEADERS) is None, path


def test_exact_path_ignores_the_query_string_and_fragment() -> None:
    table = RouteTable.build(service(route("login", path_exact="/login")))
    for path in ["/login", "/login?next=/a", "/login#top", "/login?a=1#b"]:
        assert table.match("GET", path, NO_HEADERS) is not None, path
    for path in ["/login/", "/login2", "/Login", "/x?/login"]:
        assert table.match("GET", path, NO_HEADERS) is None, path


def test_a_prefix_cannot_be_met_inside_the_query_string() -> None:
    table = RouteTable.build(service(route("admin", path_prefix="/admin")))
    assert table.match("GET", "/?/admin", NO_HEADERS) is None


def test_strip_query() -> None:
    assert strip_query("/a/b") == "/a/b"
    assert strip_query("/a?b#c") == "/a"
    assert strip_query("/a#c?d") == "/a"
    assert strip_query("?") == ""


def test_methods_restrict_a_route_case_sensitively() -> None:
    table = RouteTable.build(
        service(route("writes", methods=("POST", "PUT")), route("reads", path_prefix="/"))
    )
    assert table.match("POST", "/x", NO_HEADERS).name == "writes"  # type: ignore[union-attr]
    assert table.match("PUT", "/x", NO_HEADERS).name == "writes"  # type: ignore[union-attr]
    assert table.match("GET", "/x", NO_HEADERS).name == "reads"  # type: ignore[union-attr]
    assert table.match("post", "/x", NO_HEADERS).name == "reads"  # type: ignore[union-attr]


def test_header_matches_exact_prefix_present_and_absent() -> None:
    table = RouteTable.build(
        service(
            route("canary", headers=(HeaderMatch(name="X-Canary", exact="yes"),)),
            route("mobile", headers=(HeaderMatch(name="user-agent", prefix="MobileApp/"),)),
            route("debug", headers=(HeaderMatch(name="x-debug", present=True),)),
            route("anon", headers=(HeaderMatch(name="authorization", present=False),)),
        )
    )

    def name(headers: dict[bytes, bytes]) -> str | None:
        r = table.match("GET", "/", headers)
        return None if r is None else r.name

    assert name({b"x-canary": b"yes", b"authorization": b"t"}) == "canary"
    assert name({b"x-canary": b"YES", b"authorization": b"t"}) is None  # values are exact
    assert name({b"user-agent": b"MobileApp/3.1", b"authorization": b"t"}) == "mobile"
    assert name({b"user-agent": b"Mozilla MobileApp/3", b"authorization": b"t"}) is None
    assert name({b"x-debug": b"", b"authorization": b"t"}) == "debug"  # empty is present
    assert name({}) == "anon"
    assert name({b"authorization": b"t"}) is None


def test_every_condition_of_a_route_must_hold() -> None:
    table = RouteTable.build(
        service(
            route(
                "v2-api",
                path_prefix="/api/",
                methods=("GET",),
                headers=(
                    HeaderMatch(name="x-version", exact="2"),
                    HeaderMatch(name="x-tenant", present=True),
                ),
            )
        )
    )
    good = {b"x-version": b"2", b"x-tenant": b"a"}
    assert table.match("GET", "/api/x", good) is not None
    assert table.match("POST", "/api/x", good) is None
    assert table.match("GET", "/web", good) is None
    assert table.match("GET", "/api/x", {b"x-version": b"2"}) is None
    assert table.match("GET", "/api/x", {b"x-tenant": b"a", b"x-version": b"1"}) is None


def test_header_values_compare_as_utf8_bytes() -> None:
    table = RouteTable.build(
        service(route("café", headers=(HeaderMatch(name="x-shop", exact="café"),)))
    )
    assert table.match("GET", "/", {b"x-shop": "café".encode()}) is not None
    assert table.match("GET", "/", {b"x-shop": "café".encode("latin-1")}) is None


class OneHeader:
    """A header accessor that is not a Mapping: what a codec may hand over."""

    def __init__(self, name: bytes, value: bytes) -> None:
        self.name, self.value = name, value
        self.asked: list[bytes] = []

    def get(self, name: bytes, /) -> bytes | None:
        self.asked.append(name)
        return self.value if name == self.name else None


def test_any_object_with_get_serves_as_headers_and_names_are_asked_lower_case() -> None:
    table = RouteTable.build(service(route("c", headers=(HeaderMatch(name="X-A", exact="1"),))))
    headers = OneHeader(b"x-a", b"1")
    assert table.match("GET", "/", headers) is not None
    assert headers.asked == [b"x-a"]


# -- backends -----------------------------------------------------------------------------


def test_a_90_10_split_holds_within_two_points_over_10000_requests() -> None:
    r = split(("v1", 90), ("v2", 10))
    table = RouteTable.build(service(r))
    rng = random.Random(42)
    counts: Counter[str] = Counter()
    for _ in range(10_000):
        subset = table.select_backend(r, ALL, rng)
        counts[subset[0].labels["version"]] += 1
    assert abs(counts["v1"] / 10_000 - 0.90) <= 0.02
    assert abs(counts["v2"] / 10_000 - 0.10) <= 0.02


@pytest.mark.parametrize("seed", range(5))
def test_the_split_holds_for_any_seed(seed: int) -> None:
    r = split(("v1", 90), ("v2", 10))
    table = RouteTable.build(service(r))
    rng = random.Random(seed)
    v2 = sum(table.select_backend(r, ALL, rng) == V2 for _ in range(10_000))
    assert 800 <= v2 <= 1200


def test_the_subset_is_every_endpoint_carrying_all_the_backend_labels() -> None:
    eps = (
        endpoint(1, version="v1", zone="a"),
        endpoint(2, version="v1", zone="b"),
        endpoint(3, version="v2", zone="a"),
        endpoint(4),
    )
    r = Route(name="r", backends=(WeightedBackend(labels={"version": "v1", "zone": "a"}),))
    table = RouteTable.build(service(r))
    assert table.select_backend(r, eps, random.Random(0)) == (eps[0],)
    anyone = Route(name="r2", backends=(WeightedBackend(labels={}),))
    assert table.select_backend(anyone, eps, random.Random(0)) == eps


def test_a_backend_without_endpoints_gives_its_share_to_the_others() -> None:
    r = split(("v1", 90), ("v2", 10))
    table = RouteTable.build(service(r))
    rng = random.Random(1)
    # v2 has no healthy replica: every request goes to v1 instead of 10% failing
    assert {ids(table.select_backend(r, V1, rng)) for _ in range(1000)} == {ids(V1)}
    # three backends, the middle one empty: the other two keep their relative weights
    r3 = split(("v1", 30), ("v3", 40), ("v2", 10))
    counts = Counter(ids(table.select_backend(r3, ALL, rng)) for _ in range(10_000))
    assert set(counts) == {ids(V1), ids(V2)}
    assert abs(counts[ids(V2)] / 10_000 - 0.25) <= 0.02


def test_a_route_whose_backends_are_all_empty_has_nothing_to_balance_over() -> None:
    r = split(("v3", 50), ("v4", 50))
    table = RouteTable.build(service(r))
    assert table.select_backend(r, ALL, random.Random(0)) == ()
    assert table.select_backend(DEFAULT_ROUTE, (), random.Random(0)) == ()


def test_a_zero_weight_backend_gets_nothing_even_when_the_others_are_empty() -> None:
    r = split(("v1", 0), ("v2", 1))
    table = RouteTable.build(service(r))
    rng = random.Random(2)
    assert {ids(table.select_backend(r, ALL, rng)) for _ in range(1000)} == {ids(V2)}
    assert table.select_backend(r, V1, rng) == ()  # v1 is there but weighted 0


def test_a_pick_draws_at_most_one_random_number() -> None:
    r = split(("v1", 90), ("v2", 10))
    table = RouteTable.build(service(r))
    mine, reference = random.Random(7), random.Random(7)
    for _ in range(100):
        table.select_backend(r, ALL, mine)
        reference.random()
    assert mine.random() == reference.random()
    # one backend left: no draw at all
    table.select_backend(r, V1, mine)
    assert mine.random() == reference.random()


def test_the_same_subset_object_comes_back_until_the_endpoints_change() -> None:
    r = split(("v1", 90), ("v2", 10))
    table = RouteTable.build(service(r))
    rng = random.Random(3)
    seen = {id(table.select_backend(r, ALL, rng)) for _ in range(200)}
    assert len(seen) == 2  # one tuple per backend, reused
    grown = (*ALL, endpoint(5, version="v2"))
    picked = {ids(table.select_backend(r, grown, rng)) for _ in range(200)}
    assert picked == {ids(V1), ("orders-4", "orders-5")}  # new endpoints are picked up at once


def test_backend_shares_show_the_effective_split() -> None:
    r = split(("v1", 30), ("v3", 40), ("v2", 10))
    shares = RouteTable.build(service(r)).backend_shares(r, ALL)
    assert shares == ((V1, 0.75), (V2, 0.25))
