"""The lab's plan before anything is built: names and addresses from a prefix, where
replicas go, what scaling adds and removes, the nft scripts, and the errors for bad input."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import InputError
from node import lab_scenario as sc


def test_names_and_underlay_addresses_come_from_the_prefix() -> None:
    lay = sc.Layout(prefix="mlt-lab", nodes=2)
    assert (lay.switch_netns, lay.cp_netns) == ("mlt-lab-sw", "mlt-lab-cp")
    assert lay.node_names == ("node1", "node2")
    assert [lay.node_netns(n) for n in lay.node_names] == ["mlt-lab-node1", "mlt-lab-node2"]
    assert lay.cp_address == "198.18.20.2"
    assert [lay.node_address(n) for n in lay.node_names] == ["198.18.20.11", "198.18.20.12"]
    assert lay.api_url == "http://198.18.20.2:15080"
    assert lay.container_netns("orders", 3) == "mlt-lab-orders-3"
    for addr in (lay.cp_address, lay.resolver, *map(lay.node_address, lay.node_names)):
        assert ipaddress.ip_address(addr) in ipaddress.ip_network("198.18.0.0/15")


def test_demo_orders_spread_over_both_nodes_and_a_fourth_replica_goes_to_node2() -> None:
    lay = sc.Layout(prefix="meshlet-lab", nodes=2)
    orders = sc.DEMO.service("shop/orders")
    assert [lay.place(orders, i) for i in range(4)] == ["node1", "node2", "node1", "node2"]
    assert orders.replicas == 3 and orders.protocol == "http"
    protocols = {s.name: s.protocol for s in sc.DEMO.services}
    assert protocols == {
        "web": "http", "orders": "http", "prices": "grpc", "redis": "tcp", "load": "http",
    }  # fmt: skip
    assert [s.name for s in sc.DEMO.services if s.client] == ["load"]


@pytest.mark.parametrize(
    ("prefix", "nodes", "underlay", "says"),
    [
        ("Lab", 2, sc.DEFAULT_UNDERLAY, "--prefix 'Lab'"),
        ("a-", 2, sc.DEFAULT_UNDERLAY, "--prefix 'a-'"),
        ("x" * 30, 2, sc.DEFAULT_UNDERLAY, "2-24 lowercase"),
        ("lab", 0, sc.DEFAULT_UNDERLAY, "--nodes 0"),
        ("lab", 9, sc.DEFAULT_UNDERLAY, "1-8 nodes"),
        ("lab", 2, "203.0.113.0/24", "inside 198.18.0.0/16"),
        ("lab", 2, "198.18.0.0/23", "a /24"),
        ("lab", 2, "nonsense", "not an IPv4 network"),
    ],
)
def test_bad_layouts_are_refused_naming_the_flag(
    prefix: str, nodes: int, underlay: str, says: str
) -> None:
    with pytest.raises(InputError, match=None) as e:
        sc.Layout(prefix=prefix, nodes=nodes, underlay=underlay)
    assert says in str(e.value)


@given(st.sets(st.integers(0, 20), max_size=12), st.integers(0, 16))
def test_scale_plan_reaches_the_target_adding_lowest_free_removing_highest(
    current: set[int], target: int
) -> None:
    add, remove = sc.scale_plan(current, target)
    after = (current | set(add)) - set(remove)
    assert len(after) == target
    assert not (set(add) & current) and set(remove) <= current
    assert not (add and remove)
    if add:
        free = sorted(set(range(max(current | set(add)) + 1)) - current)
        assert add == free[: len(add)]
    if remove:
        assert min(remove) > max(after, default=-1)


def test_scale_and_kill_targets_parse_or_say_how_they_look() -> None:
    assert sc.parse_scale("shop/orders=4") == ("shop/orders", 4)
    assert sc.parse_replica("shop/orders#1") == ("shop/orders", 1)
    for bad in ("orders=4", "shop/orders", "shop/orders=-1", "shop/orders=x"):
        with pytest.raises(InputError, match="NS/NAME=N"):
            sc.parse_scale(bad)
    with pytest.raises(InputError, match="at most 16"):
        sc.parse_scale("shop/orders=17")
    with pytest.raises(InputError, match="NS/NAME#INDEX"):
        sc.parse_replica("shop/orders")
    with pytest.raises(InputError, match=r"not in the lab .*shop/orders"):
        sc.DEMO.service("shop/nothing")
    with pytest.raises(InputError, match="node3"):
        sc.Layout(prefix="lab", nodes=2).check_node("node3")


def test_partition_drops_vxlan_both_ways_in_its_own_table_and_heal_removes_only_it() -> None:
    rules = sc.partition_ruleset(4789)
    assert "table inet meshlet_lab_partition" in rules
    assert rules.count("udp dport 4789 drop") == 2
    assert "hook input" in rules and "hook output" in rules
    heal = sc.heal_ruleset()
    assert heal.splitlines() == [
        "table inet meshlet_lab_partition {}",
        "delete table inet meshlet_lab_partition",
    ]
    nat = sc.masquerade_ruleset()
    assert 'oifname "eth0" ip saddr 198.19.0.0/17 masquerade' in nat
    assert nat.startswith("table ip meshlet_lab_nat {}\ndelete table ip meshlet_lab_nat\n")
