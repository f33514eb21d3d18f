"""Per-upstream-service runtime state: the balancer, the outlier detector and the
circuit breaker of each service, kept across catalog updates.

Pure bookkeeping (no I/O, injected clock and rng): the proxies ask ``choose`` for an
endpoint and report back with ``connected``/``failed``/``finished``. Policy changes
from the control plane are applied in place, so in-flight counts survive them.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from meshlet.model import Endpoint, Service
from meshlet.runtime import Clock
from sidecar.balancer import Balancer, make_balancer
from sidecar.breaker import Breaker
from sidecar.catalog import Catalog
from sidecar.outlier import OutlierDetector


@dataclass(slots=True)
class Cluster:
    service: Service
    balancer: Balancer
    outlier: OutlierDetector
    breaker: Breaker
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    keys: tuple[str, ...] = ()  # the same tuple per catalog revision: the detector caches on it
    panics: int = 0
    ejections: int = 0


@dataclass(frozen=True, slots=True)
class Choice:
    endpoint: Endpoint | None
    panic: bool


class Clusters:
    def __init__(self, clock: Clock, rng: random.Random) -> None:
        self.clock = clock
        self.rng = rng
        self.by_service: dict[str, Cluster] = {}

    def update(self, catalog: Catalog) -> None:
        """Adopt a new catalog: new endpoints, new policy; drop what left."""
        for key in list(self.by_service):
            if key not in catalog.services:
                del self.by_service[key]
        for key, cluster in self.by_service.items():
            svc = catalog.services[key]
            if svc.policy != cluster.service.policy:
                cluster.breaker.set_limits(svc.policy.circuit_breaker)
                if svc.policy.balancing != cluster.service.policy.balancing:
                    cluster.balancer = make_balancer(svc.policy.balancing, self.clock, self.rng)
                if svc.policy.outlier_detection != cluster.service.policy.outlier_detection:
                    cluster.outlier = OutlierDetector(svc.policy.outlier_detection, self.clock)
            cluster.service = svc
            self._set_endpoints(cluster, catalog.endpoints(svc))

    def cluster(self, service: Service, catalog: Catalog) -> Cluster:
        cluster = self.by_service.get(service.key)
        if cluster is None:
            policy = service.policy
            cluster = Cluster(
                service=service,
                balancer=make_balancer(policy.balancing, self.clock, self.rng),
                outlier=OutlierDetector(policy.outlier_detection, self.clock),
                breaker=Breaker(policy.circuit_breaker),
            )
            self._set_endpoints(cluster, catalog.endpoints(service))
            self.by_service[service.key] = cluster
        return cluster

    @staticmethod
    def _set_endpoints(cluster: Cluster, endpoints: tuple[Endpoint, ...]) -> None:
        new = {e.id: e for e in endpoints}
        gone = cluster.endpoints.keys() - new.keys()
        if gone:
            cluster.balancer.forget(gone)
            cluster.outlier.forget(gone)
        cluster.endpoints = new
        keys = tuple(new)
        if keys != cluster.keys:
            cluster.keys = keys

    def choose(
        self,
        cluster: Cluster,
        exclude: Collection[str] = (),
        *,
        among: Sequence[str] | None = None,
        hash_key: bytes | None = None,
    ) -> Choice:
        """An endpoint to try, skipping ``exclude`` (the ones that just failed); L7
        passes ``among``, the keys of the route's backend subset (the same tuple each
        time for the same subset), and the ``hash_key`` for ring-hash balancing."""
        selection = cluster.outlier.available(cluster.keys if among is None else among)
        if selection.panic:
            cluster.panics += 1
        key = cluster.balancer.pick(selection.keys, exclude=exclude, hash_key=hash_key)
        return Choice(cluster.endpoints.get(key) if key else None, selection.panic)

    def starting(self, cluster: Cluster, endpoint: Endpoint) -> None:
        """A connect to ``endpoint`` begins (it counts as outstanding from now)."""
        cluster.balancer.on_start(endpoint.id)

    def connected(self, cluster: Cluster, endpoint: Endpoint, latency_s: float) -> None:
        """The connect + handshake succeeded in ``latency_s``; the connection stays open."""
        cluster.outlier.record(endpoint.id, True)
        cluster.balancer.on_finish(endpoint.id, latency_s, True)
        cluster.balancer.on_start(endpoint.id)

    def failed(self, cluster: Cluster, endpoint: Endpoint) -> bool:
        """The connect or handshake failed; True when this ejected the endpoint."""
        cluster.balancer.on_finish(endpoint.id, None, False)
        ejection = cluster.outlier.record(endpoint.id, False)
        if ejection is not None:
            cluster.ejections += 1
        return ejection is not None

    def answered(
        self, cluster: Cluster, endpoint: Endpoint, latency_s: float | None, ok: bool
    ) -> bool:
        """An L7 try that ``starting`` reported has its answer (``ok``: not a 5xx, reset
        or connect failure; ``latency_s`` to the response head). True when this ejected
        the endpoint."""
        cluster.balancer.on_finish(endpoint.id, latency_s, ok)
        ejection = cluster.outlier.record(endpoint.id, ok)
        if ejection is not None:
            cluster.ejections += 1
        return ejection is not None

    def finished(self, cluster: Cluster, endpoint: Endpoint) -> None:
        """A connection that ``connected`` reported has closed."""
        cluster.balancer.on_finish(endpoint.id, None, True)
