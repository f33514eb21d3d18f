"""Clusters as the L7 proxy uses them: picks among a route's subset, never an endpoint
already tried, sticky on a hash key, and per-request results feeding outlier ejection."""

from __future__ import annotations

import random

from meshlet.model import Endpoint, Service, ServicePort, Snapshot
from meshlet.policy import Balancing, LbAlgorithm, OutlierDetection, Policy
from meshlet.runtime import FakeClock
from sidecar.catalog import Catalog
from sidecar.clusters import Clusters


def _setup(policy: Policy) -> tuple[Clusters, Catalog, Service]:
    svc = Service(namespace="shop", name="orders", ports=(ServicePort(port=8080),), policy=policy)
    endpoints = {
        f"e{i}": Endpoint(
            id=f"e{i}", namespace="shop", service="orders", address=f"127.0.0.{i + 2}", app_port=80
        )
        for i in range(4)
    }
    catalog = Catalog.from_snapshot(
        Snapshot(revision=1, services={svc.key: svc}, endpoints=endpoints)
    )
    clusters = Clusters(FakeClock(), random.Random(7))
    clusters.update(catalog)
    return clusters, catalog, svc


def test_picks_stay_in_the_subset_and_skip_what_was_tried() -> None:
    policy = Policy(balancing=Balancing(algorithm=LbAlgorithm.ROUND_ROBIN))
    clusters, catalog, svc = _setup(policy)
    cluster = clusters.cluster(svc, catalog)
    subset = ("e1", "e3")
    picks = {clusters.choose(cluster, among=subset).endpoint.id for _ in range(10)}  # type: ignore[union-attr]
    assert picks == {"e1", "e3"}
    choice = clusters.choose(cluster, {"e1"}, among=subset)
    assert choice.endpoint is not None and choice.endpoint.id == "e3"
    assert clusters.choose(cluster, {"e1", "e3"}, among=subset).endpoint is None


def test_ring_hash_is_sticky_on_the_key() -> None:
    policy = Policy(balancing=Balancing(algorithm=LbAlgorithm.RING_HASH, hash_header="x-user"))
    clusters, catalog, svc = _setup(policy)
    cluster = clusters.cluster(svc, catalog)
    first = clusters.choose(cluster, hash_key=b"alice").endpoint
    assert all(clusters.choose(cluster, hash_key=b"alice").endpoint == first for _ in range(20))


def test_consecutive_failed_requests_eject_and_a_success_resets_the_count() -> None:
    policy = Policy(
        outlier_detection=OutlierDetection(consecutive_failures=3, max_ejection_percent=50)
    )
    clusters, catalog, svc = _setup(policy)
    cluster = clusters.cluster(svc, catalog)
    e0 = catalog.endpoints(svc)[0]
    for ok in (False, False, True, False, False):
        clusters.starting(cluster, e0)
        assert not clusters.answered(cluster, e0, 0.01 if ok else None, ok)
    clusters.starting(cluster, e0)
    assert clusters.answered(cluster, e0, None, False)  # the third failure in a row
    assert cluster.ejections == 1
    picks = {clusters.choose(cluster).endpoint.id for _ in range(40)}  # type: ignore[union-attr]
    assert "e0" not in picks
