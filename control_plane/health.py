"""Health tracking: heartbeats in, registry commands out. Pure: ``now`` is handed in.

Heartbeats are kept in memory, not in the store: writing each one would bump the
revision every few seconds per endpoint and wake every watcher. Only transitions
(healthy → unhealthy → deregistered) become commands. After a control-plane restart
every endpoint and node starts a fresh TTL, so a restart never marks the mesh unhealthy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from control_plane.registry import (
    Command,
    DeregisterEndpoint,
    SetEndpointHealth,
    SetNodeHealth,
    State,
)
from meshlet.model import Health

HEARTBEAT_INTERVAL_S = 5.0
TTL_S = 15.0
DEREGISTER_AFTER_S = 60.0  # Consul's shortest deregister_critical_service_after


@dataclass(slots=True, kw_only=True)
class HealthTracker:
    ttl_s: float = TTL_S
    deregister_after_s: float = DEREGISTER_AFTER_S
    node_ttl_s: float = TTL_S
    endpoints_seen: dict[str, float] = field(default_factory=dict)  # id → monotonic seconds
    nodes_seen: dict[str, float] = field(default_factory=dict)

    def endpoint_heartbeat(self, state: State, id_: str, now: float) -> list[Command]:
        """Record a heartbeat; an unhealthy endpoint that beats again becomes healthy."""
        self.endpoints_seen[id_] = now
        ep = state.endpoints.get(id_)
        if ep is not None and ep.health is Health.UNHEALTHY:
            return [SetEndpointHealth(id=id_, health=Health.HEALTHY)]
        return []

    def node_heartbeat(self, state: State, name: str, now: float) -> list[Command]:
        self.nodes_seen[name] = now
        node = state.nodes.get(name)
        if node is not None and node.health is not Health.HEALTHY:
            return [SetNodeHealth(name=name, health=Health.HEALTHY)]
        return []

    def last_seen(self, id_: str) -> float | None:
        return self.endpoints_seen.get(id_)

    def due(self, state: State, now: float) -> list[Command]:
        """Commands for every endpoint or node whose time has run out."""
        commands: list[Command] = []
        for id_, ep in state.endpoints.items():
            seen = self.endpoints_seen.setdefault(id_, now)  # first sight starts the clock
            silent = now - seen
            if silent > self.deregister_after_s:
                commands.append(DeregisterEndpoint(id=id_))
            elif silent > self.ttl_s and ep.health is Health.HEALTHY:
                commands.append(SetEndpointHealth(id=id_, health=Health.UNHEALTHY))
        for name, node in state.nodes.items():
            seen = self.nodes_seen.setdefault(name, now)
            if now - seen > self.node_ttl_s and node.health is Health.HEALTHY:
                commands.append(SetNodeHealth(name=name, health=Health.UNHEALTHY))
        for gone in self.endpoints_seen.keys() - state.endpoints.keys():
            del self.endpoints_seen[gone]
        for gone in self.nodes_seen.keys() - state.nodes.keys():
            del self.nodes_seen[gone]
        return commands
