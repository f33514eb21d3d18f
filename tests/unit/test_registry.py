"""The registry's pure core: allocation, exhaustion, stable VIPs, events, and the event
stream's replay property (any command sequence, replayed from any revision, gives the
same state)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.registry import (
    Command,
    Config,
    DeleteNode,
    DeleteService,
    DeregisterEndpoint,
    PutNode,
    PutService,
    RegisterEndpoint,
    SetEndpointHealth,
    SetNodeHealth,
    State,
    apply,
    replay,
)
from meshlet.errors import ConflictError, InputError, MeshError, NotFoundError
from meshlet.model import Endpoint, EventType, Health, Protocol, ServicePort
from meshlet.policy import Policy, RetryPolicy

CFG = Config(trust_domain="mesh.test")
HTTP = (ServicePort(port=8080, protocol=Protocol.HTTP),)


def put(ns: str, name: str, ports: tuple[ServicePort, ...] = HTTP, **kw: object) -> PutService:
    return PutService(namespace=ns, name=name, ports=ports, **kw)  # type: ignore[arg-type]


def endpoint(id_: str, svc: str = "orders", address: str = "198.19.1.7", **kw: object) -> Endpoint:
    return Endpoint(id=id_, namespace="shop", service=svc, address=address, app_port=8080, **kw)  # type: ignore[arg-type]


def run(commands: list[Command], cfg: Config = CFG) -> State:
    state = State()
    for c in commands:
        state, _ = apply(state, c, cfg)
    return state


def test_vips_come_from_the_range_in_order_and_stay_with_the_service() -> None:
    state = run([put("shop", "orders"), put("shop", "web"), put("shop", "pay")])
    vips = {k: s.vip for k, s in state.services.items()}
    assert vips == {
        "shop/orders": "198.19.128.1",
        "shop/web": "198.19.128.2",
        "shop/pay": "198.19.128.3",
    }
    # Updating a service (new ports, new policy) keeps its VIP.
    state, events = apply(
        state,
        put(
            "shop",
            "web",
            ports=(ServicePort(port=9090),),
            policy=Policy(retries=RetryPolicy(attempts=5)),
        ),
        CFG,
    )
    assert state.services["shop/web"].vip == "198.19.128.2"
    assert [e.type for e in events] == [EventType.MODIFIED]
    # A deleted service frees its VIP for the next one.
    state = (
        run([DeleteService(namespace="shop", name="orders")], CFG)
        if False
        else apply(state, DeleteService(namespace="shop", name="orders"), CFG)[0]
    )
    state, _ = apply(state, put("shop", "cart"), CFG)
    assert state.services["shop/cart"].vip == "198.19.128.1"


def test_a_full_vip_range_is_refused_and_the_state_is_unchanged() -> None:
    small = Config(trust_domain="mesh.test", vip_cidr="198.19.128.0/30")  # two usable hosts
    state = run([put("a", "one"), put("a", "two")], small)
    with pytest.raises(ConflictError, match=r"198\.19\.128\.0/30 is full"):
        apply(state, put("a", "three"), small)
    assert set(state.services) == {"a/one", "a/two"}


def test_reapplying_the_same_service_yields_no_event() -> None:
    state = run([put("shop", "orders")])
    again, events = apply(state, put("shop", "orders"), CFG)
    assert events == [] and again is state


def test_bad_input_is_refused_with_the_field_named() -> None:
    with pytest.raises(InputError, match="namespace 'Shop' is not a DNS label"):
        apply(State(), put("Shop", "orders"), CFG)
    with pytest.raises(InputError, match="lists a port twice"):
        apply(
            State(), put("shop", "orders", ports=(ServicePort(port=80), ServicePort(port=80))), CFG
        )
    with pytest.raises(ValueError, match="out of range"):
        ServicePort(port=70000)


def test_endpoint_registration_rules() -> None:
    state = run([put("shop", "orders")])
    with pytest.raises(NotFoundError, match="service shop/web does not exist"):
        apply(state, RegisterEndpoint(endpoint=endpoint("w1", svc="web")), CFG)
    # An agent-style registration creates the service when it brings the ports.
    created, events = apply(
        state,
        RegisterEndpoint(
            endpoint=endpoint("w1", svc="web", address="198.19.1.8"), create_service_ports=HTTP
        ),
        CFG,
    )
    assert [(e.type, e.kind.value) for e in events] == [
        (EventType.ADDED, "service"),
        (EventType.ADDED, "endpoint"),
    ]
    state, _ = apply(created, RegisterEndpoint(endpoint=endpoint("o1")), CFG)
    assert state.endpoints["o1"].identity == "spiffe://mesh.test/ns/shop/sa/orders"
    with pytest.raises(ConflictError, match="already registered as 'o1'"):
        apply(state, RegisterEndpoint(endpoint=endpoint("o2")), CFG)
    with pytest.raises(InputError, match="outside the trust domain"):
        apply(
            state,
            RegisterEndpoint(
                endpoint=endpoint("o3", address="198.19.1.9", identity="spiffe://evil/ns/a/sa/b")
            ),
            CFG,
        )
    with pytest.raises(NotFoundError, match="node 'n9' is not registered"):
        apply(
            state, RegisterEndpoint(endpoint=endpoint("o3", address="198.19.1.9", node="n9")), CFG
        )
    # Re-registering the same endpoint is idempotent.
    same, events = apply(state, RegisterEndpoint(endpoint=endpoint("o1")), CFG)
    assert events == [] and same is state


def test_deleting_a_service_removes_its_endpoints() -> None:
    state = run(
        [
            put("shop", "orders"),
            RegisterEndpoint(endpoint=endpoint("o1")),
            RegisterEndpoint(endpoint=endpoint("o2", address="198.19.1.9")),
        ]
    )
    state, events = apply(state, DeleteService(namespace="shop", name="orders"), CFG)
    assert sorted((e.type, e.key) for e in events) == [
        (EventType.DELETED, "o1"),
        (EventType.DELETED, "o2"),
        (EventType.DELETED, "shop/orders"),
    ]
    assert not state.endpoints and not state.services


def test_nodes_lease_stable_subnets_and_their_health_reaches_endpoints() -> None:
    state = run(
        [
            PutNode(name="n1", underlay_address="198.18.0.2", vtep_mac="02:00:00:00:00:01"),
            PutNode(name="n2", underlay_address="198.18.0.3", vtep_mac="02:00:00:00:00:02"),
        ]
    )
    assert (
        state.nodes["n1"].subnet == "198.19.0.0/24" and state.nodes["n2"].subnet == "198.19.1.0/24"
    )
    state, _ = apply(
        state, PutNode(name="n1", underlay_address="198.18.0.2", vtep_mac="02:00:00:00:00:09"), CFG
    )
    assert state.nodes["n1"].subnet == "198.19.0.0/24"
    with pytest.raises(ConflictError, match="already belongs to node 'n1'"):
        apply(
            state,
            PutNode(name="n3", underlay_address="198.18.0.2", vtep_mac="02:00:00:00:00:03"),
            CFG,
        )
    state = (
        run([put("shop", "orders")], CFG) if False else apply(state, put("shop", "orders"), CFG)[0]
    )
    state, _ = apply(state, RegisterEndpoint(endpoint=endpoint("o1", node="n1")), CFG)
    state, events = apply(state, SetNodeHealth(name="n1", health=Health.UNHEALTHY), CFG)
    assert state.endpoints["o1"].health is Health.UNHEALTHY
    assert {e.kind.value for e in events} == {"node", "endpoint"}
    state, _ = apply(state, DeleteNode(name="n1"), CFG)
    assert "o1" not in state.endpoints and "n1" not in state.nodes


def test_overlay_exhaustion_is_refused() -> None:
    tiny = Config(trust_domain="mesh.test", overlay_cidr="198.19.0.0/23")
    state = run(
        [
            PutNode(
                name=f"n{i}", underlay_address=f"198.18.0.{i + 2}", vtep_mac=f"02:00:00:00:00:0{i}"
            )
            for i in range(2)
        ],
        tiny,
    )
    with pytest.raises(ConflictError, match="no free /24"):
        apply(
            state,
            PutNode(name="n9", underlay_address="198.18.0.9", vtep_mac="02:00:00:00:00:09"),
            tiny,
        )


# ---- the event stream property -------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c"])
IDS = st.sampled_from(["e1", "e2", "e3", "e4"])
commands = st.one_of(
    st.builds(
        lambda n, p: put("ns", n, ports=(ServicePort(port=p),)), NAMES, st.sampled_from([80, 8080])
    ),
    st.builds(lambda n: DeleteService(namespace="ns", name=n), NAMES),
    st.builds(
        lambda i, n, a, node: RegisterEndpoint(
            endpoint=Endpoint(
                id=i, namespace="ns", service=n, address=f"198.19.0.{a}", app_port=80, node=node
            ),
            create_service_ports=(ServicePort(port=80),),
        ),
        IDS,
        NAMES,
        st.integers(1, 3),
        st.sampled_from([None, "n1"]),
    ),
    st.builds(lambda i: DeregisterEndpoint(id=i), IDS),
    st.builds(lambda i, h: SetEndpointHealth(id=i, health=h), IDS, st.sampled_from(list(Health))),
    st.builds(
        lambda a: PutNode(
            name="n1", underlay_address=f"198.18.0.{a}", vtep_mac="02:00:00:00:00:01"
        ),
        st.integers(2, 3),
    ),
    st.just(DeleteNode(name="n1")),
    st.builds(lambda h: SetNodeHealth(name="n1", health=h), st.sampled_from(list(Health))),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(commands, max_size=40))
def test_replaying_events_from_any_revision_gives_the_same_state(cmds: list[Command]) -> None:
    states = [State()]
    log: list[list] = []
    for c in cmds:
        try:
            new, events = apply(states[-1], c, CFG)
        except MeshError:
            continue  # refused: the state must be untouched (checked below by replay)
        if events:
            states.append(new)
            log.append(events)
    for start in range(len(states)):
        rebuilt = states[start]
        for batch in log[start:]:
            rebuilt = replay(rebuilt, batch)
        assert dataclasses.asdict(rebuilt) == dataclasses.asdict(states[-1])
    for before, after in itertools.pairwise(states):
        # VIPs never collide, and a service keeps its VIP for as long as it exists.
        vips = [s.vip for s in after.services.values()]
        assert len(vips) == len(set(vips))
        for key in before.services.keys() & after.services.keys():
            assert before.services[key].vip == after.services[key].vip
