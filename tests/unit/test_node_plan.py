"""The node helper's pure planner and lease table: what the overlay should be, and the
operations that get the kernel there from any state.

Properties (hypothesis): from any current state, applying the plan gives exactly the
desired state, and planning again gives nothing — the two facts behind "a restart
re-syncs to exactly the desired state, nothing duplicated, stale entries removed".
Examples pin the layout itself (flannel's: routes via the peer's VTEP address onlink,
permanent neighbour and FDB entries) and the changes a user would see.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.errors import ConflictError, InputError
from meshlet.model import Health, Node
from node import leases, plan
from node.netlink import CAP_NET_ADMIN, has_capability
from node.plan import (
    AddAddress,
    AddFdb,
    CreateVxlan,
    DeleteLink,
    Fdb,
    KernelState,
    Link,
    LocalNode,
    Neighbour,
    RemoveAddress,
    RemoveFdb,
    RemoveNeighbour,
    RemoveRoute,
    Route,
    SetLink,
    SetNeighbour,
    SetRoute,
    VxlanSettings,
)

LOCAL = LocalNode(
    name="a",
    underlay_address="198.18.10.3",
    underlay_index=2,
    underlay_mtu=1500,
    vni=4096,
    port=4789,
    subnet="198.19.0.0/24",
)


def node(name: str, underlay: str, subnet: str | None, **kw: object) -> Node:
    return Node(
        name=name,
        underlay_address=underlay,
        vtep_mac=plan.vtep_mac(underlay),
        subnet=subnet,
        **kw,  # type: ignore[arg-type]
    )


B = node("b", "198.18.10.4", "198.19.1.0/24")
C = node("c", "198.18.10.5", "198.19.2.0/24")
SELF = node("a", LOCAL.underlay_address, LOCAL.subnet)


# ---- the layout ----------------------------------------------------------------------------------


def test_desired_state_is_flannels_layout() -> None:
    want = plan.desired_state(LOCAL, [SELF, B, C])
    assert want.forwarding
    assert want.bridge == Link(
        kind="bridge",
        mtu=1450,
        mac="02:4e:c6:13:00:01",
        up=True,
        addresses=frozenset({"198.19.0.1/24"}),
    )
    assert want.vxlan == Link(
        kind="vxlan",
        mtu=1450,
        mac="02:4d:c6:12:0a:03",
        up=True,
        vxlan=VxlanSettings(vni=4096, port=4789, local="198.18.10.3", link=2, learning=False),
        addresses=frozenset({"198.19.0.0/32"}),
    )
    assert want.fdb == {
        Fdb(mac="02:4d:c6:12:0a:04", dst="198.18.10.4"),
        Fdb(mac="00:00:00:00:00:00", dst="198.18.10.4"),
        Fdb(mac="02:4d:c6:12:0a:05", dst="198.18.10.5"),
        Fdb(mac="00:00:00:00:00:00", dst="198.18.10.5"),
    }
    assert want.neighbours == {
        Neighbour(ip="198.19.1.0", mac="02:4d:c6:12:0a:04"),
        Neighbour(ip="198.19.2.0", mac="02:4d:c6:12:0a:05"),
    }
    assert want.routes == {
        Route(dst="198.19.1.0/24", via="198.19.1.0"),
        Route(dst="198.19.2.0/24", via="198.19.2.0"),
    }


def test_peers_skip_itself_unleased_nodes_and_its_own_addresses() -> None:
    unleased = node("d", "198.18.10.6", None)
    same_underlay = node("e", LOCAL.underlay_address, "198.19.3.0/24")
    same_subnet = node("f", "198.18.10.7", LOCAL.subnet)
    unhealthy = node("g", "198.18.10.8", "198.19.4.0/24", health=Health.UNHEALTHY)
    found = plan.peers(LOCAL, [SELF, B, unleased, same_underlay, same_subnet, unhealthy])
    assert [n.name for n in found] == ["b", "g"]  # a silent node's containers still answer


def test_mtu_and_macs() -> None:
    assert plan.overlay_mtu(1500) == 1450
    assert plan.overlay_mtu(9000) == 8950
    assert plan.vtep_mac("198.18.0.2") == "02:4d:c6:12:00:02"
    assert plan.bridge_mac("198.19.5.0/24") == "02:4e:c6:13:05:01"
    assert plan.gateway("198.19.5.0/24") == "198.19.5.1"
    assert plan.vtep_address("198.19.5.0/24") == "198.19.5.0"


# ---- changes a user would see ---------------------------------------------------------------------


def test_a_node_leaving_removes_exactly_its_entries() -> None:
    before = plan.desired_state(LOCAL, [SELF, B, C])
    ops = plan.plan(before, plan.desired_state(LOCAL, [SELF, B]))
    assert ops == [
        RemoveRoute(dst="198.19.2.0/24", metric=0),
        RemoveNeighbour(ip="198.19.2.0"),
        RemoveFdb(entry=Fdb(mac="00:00:00:00:00:00", dst="198.18.10.5")),
        RemoveFdb(entry=Fdb(mac="02:4d:c6:12:0a:05", dst="198.18.10.5")),
    ]


def test_a_node_joining_is_programmed_fdb_then_neighbour_then_route() -> None:
    before = plan.desired_state(LOCAL, [SELF, B])
    ops = plan.plan(before, plan.desired_state(LOCAL, [SELF, B, C]))
    assert [type(op) for op in ops] == [AddFdb, AddFdb, SetNeighbour, SetRoute]


def test_restart_removes_stale_entries_and_duplicates_nothing() -> None:
    want = plan.desired_state(LOCAL, [SELF, B])
    stale_fdb = Fdb(mac="02:4d:c6:12:0a:63", dst="198.18.10.99")
    planted = KernelState(
        forwarding=True,
        bridge=want.bridge,
        vxlan=want.vxlan,
        fdb=want.fdb | {stale_fdb},
        neighbours=want.neighbours | {Neighbour(ip="198.19.99.0", mac="02:4d:c6:12:0a:63")},
        routes=want.routes | {Route(dst="198.19.99.0/24", via="198.19.99.0")},
    )
    assert plan.plan(planted, want) == [
        RemoveRoute(dst="198.19.99.0/24", metric=0),
        RemoveNeighbour(ip="198.19.99.0"),
        RemoveFdb(entry=stale_fdb),
    ]
    assert plan.plan(want, want) == []


def test_changed_neighbour_and_route_are_replaced_in_place() -> None:
    want = plan.desired_state(LOCAL, [SELF, B])
    wrong = KernelState(
        forwarding=True,
        bridge=want.bridge,
        vxlan=want.vxlan,
        fdb=want.fdb,
        neighbours=frozenset({Neighbour(ip="198.19.1.0", mac="02:00:00:00:00:01")}),
        routes=frozenset({Route(dst="198.19.1.0/24", via="198.19.1.9", onlink=False)}),
    )
    ops = plan.plan(wrong, want)
    assert ops == [
        SetNeighbour(entry=Neighbour(ip="198.19.1.0", mac="02:4d:c6:12:0a:04")),
        SetRoute(entry=Route(dst="198.19.1.0/24", via="198.19.1.0")),
    ]


def test_new_vxlan_settings_recreate_the_device_and_every_entry() -> None:
    old = plan.desired_state(LOCAL, [SELF, B])
    new_local = LocalNode(**{**_fields(LOCAL), "vni": 4097})
    want = plan.desired_state(new_local, [SELF, B])
    ops = plan.plan(old, want)
    assert ops[:2] == [DeleteLink(name=plan.VXLAN), ops[1]]
    assert isinstance(ops[1], CreateVxlan) and ops[1].settings.vni == 4097
    assert sum(isinstance(op, (AddFdb, SetNeighbour, SetRoute)) for op in ops) == 4
    assert plan.simulate(old, ops) == want


def test_an_underlay_mtu_change_only_sets_the_mtu() -> None:
    old = plan.desired_state(LOCAL, [SELF, B])
    want = plan.desired_state(LocalNode(**{**_fields(LOCAL), "underlay_mtu": 9000}), [SELF, B])
    assert plan.plan(old, want) == [
        SetLink(name=plan.BRIDGE, mtu=8950, mac=plan.bridge_mac(LOCAL.subnet)),
        SetLink(name=plan.VXLAN, mtu=8950, mac=plan.vtep_mac(LOCAL.underlay_address)),
    ]


def test_a_new_subnet_moves_the_addresses() -> None:
    old = plan.desired_state(LOCAL, [SELF, B])
    want = plan.desired_state(LocalNode(**{**_fields(LOCAL), "subnet": "198.19.7.0/24"}), [B])
    ops = plan.plan(old, want)
    assert RemoveAddress(link=plan.BRIDGE, address="198.19.0.1/24") in ops
    assert AddAddress(link=plan.BRIDGE, address="198.19.7.1/24") in ops
    assert AddAddress(link=plan.VXLAN, address="198.19.7.0/32") in ops


def test_teardown_deletes_both_devices_and_leaves_forwarding() -> None:
    current = plan.desired_state(LOCAL, [SELF, B, C])
    ops = plan.plan(current, plan.teardown_state(current))
    assert ops == [DeleteLink(name=plan.BRIDGE), DeleteLink(name=plan.VXLAN)]
    assert plan.simulate(current, ops) == KernelState(forwarding=True)


def test_simulate_refuses_a_route_before_its_neighbour() -> None:
    want = plan.desired_state(LOCAL, [SELF, B])
    bare = KernelState(forwarding=True, bridge=want.bridge, vxlan=want.vxlan)
    with pytest.raises(plan.PlanError):
        plan.simulate(bare, [SetRoute(entry=Route(dst="198.19.1.0/24", via="198.19.1.0"))])


def _fields(local: LocalNode) -> dict[str, object]:
    return {name: getattr(local, name) for name in LocalNode.__dataclass_fields__}


# ---- properties: any state → desired, and then nothing ---------------------------------------------

octet = st.integers(min_value=0, max_value=255)
underlays = st.builds(lambda a, b: f"198.18.{a}.{b}", octet, st.integers(1, 254))
subnets = st.builds(lambda a: f"198.19.{a}.0/24", st.integers(0, 127))
macs = st.builds(
    lambda bs: ":".join(f"{b:02x}" for b in bs), st.lists(octet, min_size=6, max_size=6)
)
small_addresses = st.frozensets(
    st.builds(lambda a, n: f"198.19.{a}.{n}/24", st.integers(0, 3), st.integers(0, 3)), max_size=3
)
settings_ = st.builds(
    VxlanSettings,
    vni=st.sampled_from([4096, 4097, 7]),
    port=st.sampled_from([4789, 8472]),
    local=st.sampled_from(["198.18.10.3", "198.18.10.9"]),
    link=st.sampled_from([None, 2, 3]),
    learning=st.booleans(),
)


@st.composite
def links(draw: st.DrawFn, kind: str) -> Link:
    drawn_kind = draw(st.sampled_from([kind, kind, "veth"]))
    return Link(
        kind=drawn_kind,
        mtu=draw(st.sampled_from([1450, 1500, 8950])),
        mac=draw(st.sampled_from(["02:4e:c6:13:00:01", "02:4d:c6:12:0a:03", "02:00:00:00:00:09"])),
        up=draw(st.booleans()),
        master=draw(st.sampled_from([None, 7])),
        vxlan=draw(settings_) if drawn_kind == "vxlan" else None,
        addresses=draw(small_addresses),
    )


peer_ips = st.builds(lambda a: f"198.19.{a}.0", st.integers(0, 6))
peer_nets = st.builds(
    lambda a, m: (f"198.19.{a}.0/24", m), st.integers(0, 6), st.sampled_from([0, 0, 100])
)


@st.composite
def current_states(draw: st.DrawFn) -> KernelState:
    bridge = draw(st.none() | links("bridge"))
    vxlan = draw(st.none() | links("vxlan"))
    if vxlan is None:
        return KernelState(forwarding=draw(st.booleans()), bridge=bridge)
    fdb = draw(
        st.frozensets(
            st.builds(
                Fdb, mac=st.sampled_from([plan.FLOOD_MAC, "02:4d:c6:12:0a:04"]), dst=underlays
            ),
            max_size=4,
        )
    )
    neighbours = {
        n.ip: n
        for n in draw(
            st.lists(
                st.builds(Neighbour, ip=peer_ips, mac=macs, permanent=st.booleans()), max_size=4
            )
        )
    }
    routes = {
        (r.dst, r.metric): r
        for r in draw(
            st.lists(
                st.builds(
                    lambda dm, via, onlink: Route(dst=dm[0], via=via, onlink=onlink, metric=dm[1]),
                    peer_nets,
                    peer_ips,
                    st.booleans(),
                ),
                max_size=4,
            )
        )
    }
    return KernelState(
        forwarding=draw(st.booleans()),
        bridge=bridge,
        vxlan=vxlan,
        fdb=fdb,
        neighbours=frozenset(neighbours.values()),
        routes=frozenset(routes.values()),
    )


@st.composite
def maps(draw: st.DrawFn) -> tuple[LocalNode, list[Node]]:
    """This node and a node map as the registry keeps it (unique names, underlays, subnets)."""
    count = draw(st.integers(0, 5))
    indexes = draw(st.lists(st.integers(0, 6), min_size=count + 1, max_size=count + 1, unique=True))
    hosts = draw(st.lists(st.integers(1, 254), min_size=count + 1, max_size=count + 1, unique=True))
    local = LocalNode(
        **{
            **_fields(LOCAL),
            "underlay_address": f"198.18.10.{hosts[0]}",
            "subnet": f"198.19.{indexes[0]}.0/24",
            "underlay_mtu": draw(st.sampled_from([1500, 9000])),
            "vni": draw(st.sampled_from([4096, 7])),
        }
    )
    nodes = [node("a", local.underlay_address, local.subnet)]
    for i in range(count):
        nodes.append(
            node(
                f"n{i}",
                f"198.18.10.{hosts[i + 1]}",
                draw(st.sampled_from([f"198.19.{indexes[i + 1]}.0/24", None])),
            )
        )
    return local, nodes


@settings(max_examples=400, deadline=None)
@given(current_states(), maps(), st.booleans())
def test_applying_the_plan_gives_the_desired_state_and_a_second_plan_is_empty(
    current: KernelState, local_and_nodes: tuple[LocalNode, list[Node]], tear_down: bool
) -> None:
    local, nodes = local_and_nodes
    desired = plan.teardown_state(current) if tear_down else plan.desired_state(local, nodes)
    ops = plan.plan(current, desired)
    after = plan.simulate(current, ops)
    assert after == desired
    assert plan.plan(after, desired) == []
    assert len(ops) == len(set(ops)), "an operation planned twice"


@settings(max_examples=200, deadline=None)
@given(maps())
def test_the_desired_state_is_a_fixed_point(local_and_nodes: tuple[LocalNode, list[Node]]) -> None:
    local, nodes = local_and_nodes
    desired = plan.desired_state(local, nodes)
    assert plan.plan(desired, desired) == []
    peers = plan.peers(local, nodes)
    assert len(desired.routes) == len(desired.neighbours) == len(peers)
    assert len(desired.fdb) == 2 * len(peers)


# ---- leases ----------------------------------------------------------------------------------------


def lease(netns: str, address: str) -> leases.Lease:
    return leases.Lease(
        netns=netns,
        address=address,
        service="shop/web",
        host_interface=leases.host_interface(netns),
    )


def test_next_free_skips_network_gateway_and_reuses_the_lowest_freed() -> None:
    table = leases.Leases(subnet="198.19.3.0/24")
    assert leases.next_free(table) == "198.19.3.2"
    table = table.with_lease(lease("x", "198.19.3.2")).with_lease(lease("y", "198.19.3.3"))
    assert leases.next_free(table) == "198.19.3.4"
    assert leases.next_free(table.without("x")) == "198.19.3.2"


def test_a_full_subnet_is_refused() -> None:
    table = leases.Leases(subnet="198.19.3.0/29")  # .2 .. .6 for containers
    for i in range(2, 7):
        table = table.with_lease(lease(f"c{i}", f"198.19.3.{i}"))
    with pytest.raises(ConflictError, match="no free address"):
        leases.next_free(table)


def test_host_interface_names_fit_and_are_stable() -> None:
    name = leases.host_interface("mlt-nd1234-c1")
    assert name == leases.host_interface("mlt-nd1234-c1") != leases.host_interface("mlt-nd1234-c2")
    assert len(name) <= 15 and name.startswith("mv")


def test_rebase_drops_leases_outside_a_new_subnet() -> None:
    table = leases.Leases(subnet="198.19.3.0/24").with_lease(lease("x", "198.19.3.2"))
    assert leases.rebase(table, "198.19.4.0/24") == leases.Leases(subnet="198.19.4.0/24")


@given(
    st.dictionaries(
        st.text("abcdefgh-", min_size=1, max_size=12),
        st.integers(2, 254),
        max_size=6,
    )
)
def test_lease_files_round_trip(entries: dict[str, int]) -> None:
    table = leases.Leases(subnet="198.19.3.0/24")
    for netns, host in entries.items():
        table = table.with_lease(lease(netns, f"198.19.3.{host}"))
    assert leases.decode(leases.encode(table), source="t") == table


def test_a_damaged_lease_file_is_named() -> None:
    with pytest.raises(InputError, match=r"broken\.json"):
        leases.decode(
            b'{"version": 1, "subnet": "198.19.3.0/24", "leases": [{}]}', source="broken.json"
        )


def test_net_admin_is_read_from_the_effective_set() -> None:
    status = "Name:\tx\nCapInh:\t0\nCapEff:\t{:016x}\n"
    assert has_capability(status.format(1 << CAP_NET_ADMIN), CAP_NET_ADMIN)
    assert not has_capability(status.format(0x1FFFFFFFFFF & ~(1 << CAP_NET_ADMIN)), CAP_NET_ADMIN)
