"""The lab's journal read back: what `lab down` removes, in what order, and what `lab status`
reports — including after a crash left a half-written last line."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from node import lab_state as ls


def journal(*records: dict[str, object]) -> bytes:
    return b"".join(ls.encode(r) for r in records)


def built() -> list[dict[str, object]]:
    return [
        ls.add("dir", ls.dir_id("/run/lab"), path="/run/lab", only_if_empty=True),
        ls.add("lab", "lab", prefix="p", nodes=2, underlay="198.18.20.0/24", scenario="demo"),
        ls.add("dir", ls.dir_id("/run/lab/logs"), path="/run/lab/logs", only_if_empty=False),
        ls.add("netns", ls.netns_id("p-sw"), name="p-sw", role="switch"),
        ls.add("netns", ls.netns_id("p-cp"), name="p-cp", role="control plane"),
        ls.add(
            "process",
            ls.process_id("control-plane"),
            name="control-plane",
            role="control-plane",
            netns="p-cp",
            pid=10,
            start=100,
        ),
        ls.add("netns", ls.netns_id("p-node1"), name="p-node1", role="node"),
        ls.add(
            "process",
            ls.process_id("node-node1"),
            name="node-node1",
            role="node",
            netns="p-node1",
            pid=11,
            start=101,
        ),
        ls.add(
            "replica",
            ls.replica_id("shop/orders", 0),
            service="shop/orders",
            index=0,
            name="orders-0",
            node="node1",
            netns="p-orders-0",
        ),
        ls.add("netns", ls.netns_id("p-orders-0"), name="p-orders-0", role="container"),
        ls.add(
            "file",
            ls.file_id("/etc/netns/p-orders-0/resolv.conf"),
            path="/etc/netns/p-orders-0/resolv.conf",
        ),
        ls.add(
            "process",
            ls.process_id("app-orders-0"),
            name="app-orders-0",
            role="app",
            netns="p-orders-0",
            pid=12,
            start=102,
        ),
        ls.add(
            "process",
            ls.process_id("sidecar-orders-0"),
            name="sidecar-orders-0",
            role="sidecar",
            netns="p-orders-0",
            pid=13,
            start=103,
        ),
        ls.add(
            "process",
            ls.process_id("app-load-0"),
            name="app-load-0",
            role="load",
            netns="p-load-0",
            pid=14,
            start=104,
        ),
    ]


def test_down_stops_traffic_first_the_control_plane_last_and_deletes_in_reverse() -> None:
    plan = ls.teardown(ls.fold(built()))
    assert [p["name"] for p in plan.processes] == [
        "app-load-0",
        "app-orders-0",
        "sidecar-orders-0",
        "node-node1",
        "control-plane",
    ]
    assert plan.namespaces == ("p-orders-0", "p-node1", "p-cp", "p-sw")
    assert plan.files == ("/etc/netns/p-orders-0/resolv.conf",)
    # the logs directory (removed with its content) before the run directory (if empty)
    assert [(d["path"], d["only_if_empty"]) for d in plan.dirs] == [
        ("/run/lab/logs", False),
        ("/run/lab", True),
    ]


def test_a_torn_last_line_is_ignored_and_everything_before_it_is_kept() -> None:
    data = journal(*built())
    torn = data + b'{"op":"add","id":"netns:p-web-0","kind":"ne'
    assert ls.decode(torn) == ls.decode(data)
    assert ls.teardown(ls.fold(ls.decode(torn))).namespaces[0] == "p-orders-0"


@given(st.binary(max_size=300))
def test_decode_never_raises_on_garbage(data: bytes) -> None:
    for record in ls.decode(data):
        assert isinstance(record["id"], str)


def test_forget_removes_and_a_later_add_replaces_in_place() -> None:
    records = built()
    replica = ls.replica_id("shop/orders", 0)
    records.append(
        ls.add(
            "replica",
            replica,
            service="shop/orders",
            index=0,
            name="orders-0",
            node="node1",
            netns="p-orders-0",
            address="198.19.0.2",
        )
    )
    state = ls.fold(records)
    assert state.replicas("shop/orders")[0]["address"] == "198.19.0.2"
    assert [e["id"] for e in state.entries].index(replica) == 8  # still where it was made
    for rid in (
        ls.process_id("app-orders-0"),
        ls.process_id("sidecar-orders-0"),
        ls.netns_id("p-orders-0"),
        replica,
    ):
        records.append(ls.forget(rid))
    state = ls.fold(records)
    assert state.replicas() == []
    assert "p-orders-0" not in ls.teardown(state).namespaces
    assert [p["name"] for p in state.processes()] == ["control-plane", "node-node1", "app-load-0"]


def test_status_says_what_is_there_missing_or_dead() -> None:
    state = ls.fold(built())
    facts = ls.Facts(
        namespaces=frozenset({"p-sw", "p-cp", "p-node1"}),
        live_processes=frozenset({ls.process_id("control-plane"), ls.process_id("node-node1")}),
        paths=frozenset({"/run/lab", "/run/lab/logs"}),
    )
    status = ls.status_rows(state, facts)
    problems = {(r.kind, r.name, r.state) for r in status.problems}
    assert problems == {
        ("netns", "p-orders-0", "missing"),
        ("file", "/etc/netns/p-orders-0/resolv.conf", "missing"),
        ("process", "app-orders-0", "dead"),
        ("process", "sidecar-orders-0", "dead"),
        ("process", "app-load-0", "dead"),
    }
    assert len(status.rows) == len(state.resources) == 12


def test_an_empty_journal_is_an_empty_lab() -> None:
    state = ls.fold(ls.decode(b""))
    assert state.empty and state.lab is None
    assert ls.teardown(state) == ls.Teardown()
