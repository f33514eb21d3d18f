"""The sidecar's read-only view of the mesh, rebuilt from each discovery snapshot.

Answers the questions the data path asks: which service did the app dial (VIP:port),
which endpoints may serve it, what does a DNS name mean. Pure and immutable: a new
snapshot makes a new Catalog, and in-flight connections keep the one they started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshlet.model import Endpoint, Health, Service, Snapshot

MESH_DOMAIN = "svc.meshlet"


@dataclass(frozen=True, slots=True, kw_only=True)
class Catalog:
    revision: int = 0
    services: dict[str, Service] = field(default_factory=dict)  # "ns/name" → service
    by_vip: dict[tuple[str, int], Service] = field(default_factory=dict)
    healthy: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)  # by service key
    everyone: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> Catalog:
        by_vip: dict[tuple[str, int], Service] = {}
        for svc in snap.services.values():
            if svc.vip:
                for p in svc.ports:
                    by_vip[(svc.vip, p.port)] = svc
        everyone: dict[str, list[Endpoint]] = {k: [] for k in snap.services}
        for ep in snap.endpoints.values():
            everyone.setdefault(ep.service_key, []).append(ep)
        ordered = {k: tuple(sorted(v, key=lambda e: e.id)) for k, v in everyone.items()}
        return cls(
            revision=snap.revision,
            services=dict(snap.services),
            by_vip=by_vip,
            healthy={
                k: tuple(e for e in v if e.health is Health.HEALTHY) for k, v in ordered.items()
            },
            everyone=ordered,
        )

    def service_at(self, address: str, port: int) -> Service | None:
        """The service whose VIP:port the app dialled, if any."""
        return self.by_vip.get((address, port))

    def service(self, namespace: str, name: str) -> Service | None:
        return self.services.get(f"{namespace}/{name}")

    def endpoints(self, service: Service) -> tuple[Endpoint, ...]:
        return self.healthy.get(service.key, ())

    def resolve_name(self, name: str, local_namespace: str) -> tuple[Service | None, bool, bool]:
        """Interpret a DNS name: ``(service, tasks, in_mesh_domain)``.

        ``NAME`` (the caller's namespace), ``NAME.NS`` and ``NAME.NS.svc.meshlet`` name a
        service; a ``tasks.`` prefix asks for its replicas (Docker's convention).
        ``in_mesh_domain`` says whether the name is ours to answer (NXDOMAIN if unknown)
        rather than the upstream resolver's.
        """
        labels = name.rstrip(".").lower().split(".")
        tasks = len(labels) > 1 and labels[0] == "tasks"
        if tasks:
            labels = labels[1:]
        in_domain = labels[-2:] == MESH_DOMAIN.split(".")
        if in_domain:
            labels = labels[:-2]
            if len(labels) != 2:
                return None, tasks, True
        if len(labels) == 1:
            return self.service(local_namespace, labels[0]), tasks, False
        if len(labels) == 2:
            return self.service(labels[1], labels[0]), tasks, in_domain
        return None, tasks, in_domain
