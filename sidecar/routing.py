"""L7 routing: which route of a service a request takes, and which backend of that route
(the endpoint subset, by labels) serves it.

The contract with the proxy:

- ``RouteTable.build(service)`` once per policy change (compare ``service.policy.routes``).
- ``table.match(method, path, headers) -> Route | None`` per request. Routes are tried
  in the order the policy lists them; the first whose every condition holds wins.
  ``None`` means no route: answer 404 and log the ``NR`` flag (Envoy). A service with
  no routes has one implicit route, ``DEFAULT_ROUTE`` (every request, every endpoint).
- ``table.select_backend(route, endpoints, rng) -> tuple[Endpoint, ...]`` per request
  (and per retry): the endpoints to balance over. ``()`` means no backend of the route
  has an endpoint: answer 503 and log ``UH``.

Matching rules (Envoy's, so that configurations read the same):

- ``path`` is the request target in origin form; the query (from the first ``?``) and
  any fragment are not part of it. No normalisation is done (no percent-decoding, no
  ``..`` folding): routing is not an authorisation boundary here.
- ``path_exact``: the path equals it. ``path_prefix``: a plain, case-sensitive string
  prefix, as Envoy's ``prefix`` (not segment-aware: ``/api`` matches ``/api``,
  ``/api/x`` and ``/apix``; write ``/api/`` to mean the directory). A path that does not
  start with ``/`` (``*``, absolute form) matches only routes without a path condition.
- ``methods``: the method is one of them (case-sensitive, RFC 9110); empty: any method.
- ``headers``: every one holds. Names are looked up lower-cased; values compare as
  bytes (the policy's text encoded as UTF-8), case-sensitive; ``exact``/``prefix``
  need the header present; ``present=True`` needs it there, ``present=False`` absent.

Backend selection:

- A backend's subset is the endpoints carrying all of its labels (``{}``: every
  endpoint), in the order given. A route without backends balances over every endpoint.
- A backend with weight 0 or an empty subset is skipped and its share goes to the
  others in proportion to their weights, so a 90/10 v1/v2 split whose v2 has no healthy
  replica sends everything to v1 instead of failing 10% of requests (Envoy would send
  them to the empty cluster and answer 503; we prefer to serve). Only when every
  weighted backend is empty is the answer ``()``.
- Subsets and cumulative weights are computed once per (route, endpoints) and reused
  while the caller passes the same ``endpoints`` object (the catalog hands out one tuple
  per revision), so a pick costs at most one ``rng.random()`` and a bisect. The subset
  returned is the same tuple object each time, so callers may cache on its identity.

Pure: never imports asyncio, socket or ssl; never reads the clock or ``random`` but the
``Random`` it is handed; never logs.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from meshlet.model import Endpoint, Service
from meshlet.policy import HeaderMatch, Route, RouteMatch, WeightedBackend

DEFAULT_ROUTE = Route(name="default")  # the implicit route of a service without routes


class HeaderLookup(Protocol):
    """Read access to request headers by lower-case name; ``Mapping[bytes, bytes]`` fits.

    A repeated header is the codec's to combine (RFC 9110: values joined with ``, ``).
    """

    def get(self, name: bytes, /) -> bytes | None: ...


def strip_query(path: str) -> str:
    """The path without its query string or fragment."""
    cut = len(path)
    q = path.find("?")
    if q >= 0:
        cut = q
    h = path.find("#", 0, cut)
    if h >= 0:
        cut = h
    return path if cut == len(path) else path[:cut]


_EXACT, _PREFIX, _PRESENT, _ABSENT = range(4)


class _CompiledRoute:
    __slots__ = ("headers", "methods", "path_exact", "path_prefix", "route")

    def __init__(self, route: Route) -> None:
        m: RouteMatch = route.match
        self.route = route
        self.path_exact = m.path_exact
        self.path_prefix = m.path_prefix
        self.methods = frozenset(m.methods) if m.methods else None
        self.headers = tuple(_compile_header(h) for h in m.headers)

    def matches(self, method: str, path: str, headers: HeaderLookup) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        for name, kind, want in self.headers:
            value = headers.get(name)
            if kind == _EXACT:
                if value != want:
                    return False
            elif kind == _PREFIX:
                if value is None or not value.startswith(want):
                    return False
            elif kind == _PRESENT:
                if value is None:
                    return False
            elif value is not None:  # _ABSENT
                return False
        return True


def _compile_header(h: HeaderMatch) -> tuple[bytes, int, bytes]:
    name = h.name.lower().encode("ascii")
    if h.exact is not None:
        return name, _EXACT, h.exact.encode()
    if h.prefix is not None:
        return name, _PREFIX, h.prefix.encode()
    return name, _PRESENT if h.present else _ABSENT, b""


def _carries(endpoint: Endpoint, labels: Mapping[str, str]) -> bool:
    have = endpoint.labels
    return all(have.get(k) == v for k, v in labels.items())


class _Plan:
    """A route's backends resolved against one endpoints object."""

    __slots__ = ("cumulative", "endpoints", "route", "subsets", "total")

    def __init__(self, route: Route, endpoints: Sequence[Endpoint]) -> None:
        self.route = route
        self.endpoints = endpoints  # held, so its identity cannot be reused while cached
        subsets: list[tuple[Endpoint, ...]] = []
        cumulative: list[int] = []
        total = 0
        if not route.backends:
            everyone = endpoints if isinstance(endpoints, tuple) else tuple(endpoints)
            if everyone:
                subsets.append(everyone)
                total = 1
                cumulative.append(total)
        else:
            for backend in route.backends:
                subset = _subset(backend, endpoints)
                if backend.weight > 0 and subset:
                    subsets.append(subset)
                    total += backend.weight
                    cumulative.append(total)
        self.subsets = tuple(subsets)
        self.cumulative = tuple(cumulative)
        self.total = total

    def pick(self, rng: random.Random) -> tuple[Endpoint, ...]:
        subsets = self.subsets
        if len(subsets) <= 1:
            return subsets[0] if subsets else ()
        i = bisect.bisect_right(self.cumulative, rng.random() * self.total)
        return subsets[min(i, len(subsets) - 1)]


def _subset(backend: WeightedBackend, endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    if not backend.labels:
        return tuple(endpoints)
    return tuple(e for e in endpoints if _carries(e, backend.labels))


class RouteTable:
    """The compiled routes of one service. Build a new one when its policy changes."""

    __slots__ = ("_compiled", "_plans", "routes", "service_key")

    def __init__(self, service_key: str, routes: Sequence[Route]) -> None:
        self.service_key = service_key
        self.routes: tuple[Route, ...] = tuple(routes) or (DEFAULT_ROUTE,)
        self._compiled = tuple(_CompiledRoute(r) for r in self.routes)
        self._plans: dict[str, _Plan] = {}

    @classmethod
    def build(cls, service: Service) -> RouteTable:
        return cls(service.key, service.policy.routes)

    def match(self, method: str, path: str, headers: HeaderLookup) -> Route | None:
        """The first route (in policy order) the request satisfies; None: no route (404)."""
        path = strip_query(path)
        for compiled in self._compiled:
            if compiled.matches(method, path, headers):
                return compiled.route
        return None

    def select_backend(
        self, route: Route, endpoints: Sequence[Endpoint], rng: random.Random
    ) -> tuple[Endpoint, ...]:
        """The endpoint subset of a backend of ``route`` chosen by weight; ``()``: none.

        ``endpoints`` are the service's endpoints fit to serve (the catalog's healthy
        tuple). Draws at most one ``rng.random()``.
        """
        plan = self._plans.get(route.name)
        if plan is None or plan.endpoints is not endpoints or plan.route is not route:
            plan = self._plans[route.name] = _Plan(route, endpoints)
        return plan.pick(rng)

    def backend_shares(
        self, route: Route, endpoints: Sequence[Endpoint]
    ) -> tuple[tuple[tuple[Endpoint, ...], float], ...]:
        """Each non-empty subset with the share of requests it gets (for the admin view)."""
        plan = _Plan(route, endpoints)
        shares: list[tuple[tuple[Endpoint, ...], float]] = []
        previous = 0
        for subset, cum in zip(plan.subsets, plan.cumulative, strict=True):
            shares.append((subset, (cum - previous) / plan.total))
            previous = cum
        return tuple(shares)
