"""Heartbeat TTLs on a hand-moved clock: healthy → unhealthy after the TTL, back to
healthy on the next beat, deregistered after the grace; nodes likewise."""

from __future__ import annotations

from control_plane.health import HealthTracker
from control_plane.registry import (
    Config,
    DeregisterEndpoint,
    PutNode,
    PutService,
    RegisterEndpoint,
    SetEndpointHealth,
    SetNodeHealth,
    State,
    apply,
)
from meshlet.model import Endpoint, Health, ServicePort

CFG = Config(trust_domain="mesh.test")


def mesh() -> State:
    state = State()
    for c in (
        PutService(namespace="shop", name="orders", ports=(ServicePort(port=80),)),
        PutNode(name="n1", underlay_address="198.18.0.2", vtep_mac="02:00:00:00:00:01"),
        RegisterEndpoint(
            endpoint=Endpoint(
                id="o1",
                namespace="shop",
                service="orders",
                address="198.19.0.5",
                app_port=80,
                node="n1",
            )
        ),
    ):
        state, _ = apply(state, c, CFG)
    return state


def run_due(tracker: HealthTracker, state: State, now: float) -> tuple[State, list[object]]:
    commands = tracker.due(state, now)
    for c in commands:
        state, _ = apply(state, c, CFG)
    return state, commands


def test_missed_ttl_marks_unhealthy_then_a_beat_restores_then_grace_deregisters() -> None:
    tracker = HealthTracker(ttl_s=15, deregister_after_s=60, node_ttl_s=15)
    state = mesh()
    tracker.endpoint_heartbeat(state, "o1", 0.0)
    tracker.node_heartbeat(state, "n1", 0.0)
    state, cmds = run_due(tracker, state, 14.0)
    assert cmds == []
    tracker.node_heartbeat(state, "n1", 14.0)
    state, cmds = run_due(tracker, state, 15.5)
    assert cmds == [SetEndpointHealth(id="o1", health=Health.UNHEALTHY)]
    assert state.endpoints["o1"].health is Health.UNHEALTHY
    # A second pass does not repeat the transition.
    assert run_due(tracker, state, 16.0)[1] == []
    back = tracker.endpoint_heartbeat(state, "o1", 20.0)
    assert back == [SetEndpointHealth(id="o1", health=Health.HEALTHY)]
    state, _ = apply(state, back[0], CFG)
    tracker.node_heartbeat(state, "n1", 70.0)
    state, cmds = run_due(tracker, state, 81.0)
    assert cmds == [DeregisterEndpoint(id="o1")]
    assert "o1" not in state.endpoints
    run_due(tracker, state, 82.0)
    assert tracker.last_seen("o1") is None  # forgotten once gone


def test_a_draining_endpoint_is_not_revived_by_heartbeats() -> None:
    tracker = HealthTracker()
    state, _ = apply(mesh(), SetEndpointHealth(id="o1", health=Health.DRAINING), CFG)
    assert tracker.endpoint_heartbeat(state, "o1", 1.0) == []


def test_a_silent_node_marks_its_endpoints_unhealthy() -> None:
    tracker = HealthTracker(ttl_s=100, node_ttl_s=15)
    state = mesh()
    tracker.node_heartbeat(state, "n1", 0.0)
    tracker.endpoint_heartbeat(state, "o1", 0.0)
    state, cmds = run_due(tracker, state, 16.0)
    assert cmds == [SetNodeHealth(name="n1", health=Health.UNHEALTHY)]
    assert state.endpoints["o1"].health is Health.UNHEALTHY


def test_after_a_restart_everyone_gets_a_fresh_ttl() -> None:
    tracker = HealthTracker(ttl_s=15)  # a new process: nothing seen yet
    state = mesh()
    assert run_due(tracker, state, 1000.0)[1] == []
    assert run_due(tracker, state, 1014.0)[1] == []
    assert run_due(tracker, state, 1016.0)[1] != []
