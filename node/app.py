"""`meshlet node run`: one node helper process, from registration to shutdown.

For: every host of the mesh. It checks NET_ADMIN, registers the node with the control
plane (join token; the answer leases its /24), watches the node map (Discovery.Watch,
kind "node"; resumes from its revision after a reconnect, with full-jitter backoff) and
re-syncs the kernel on start, on every change of the map, after every reconnect and every
``resync_s``: read the kernel (``node.netlink``), ``plan`` against ``desired_state``
(``node.plan``), apply. It heartbeats every ``heartbeat_s`` and registers again when the
control plane forgets the node. Once the first sync is done it writes STATE_DIR/NAME.json.

Nothing is changed before the first node map arrives, so a restart (or a control plane
that is down) never drops the routes to other nodes; SIGTERM exits 0 and leaves the overlay
as it is, for the next start to re-sync. With ``teardown_on_exit`` it instead deregisters
the node and removes the bridge, the VXLAN device (and so every entry on it), the
containers' veths it knows of and its state files.

Runs on the stock asyncio loop: uvloop cannot open the AF_NETLINK sockets pyroute2 needs,
and nothing here is a hot path. Must never: change the kernel itself (``node.netlink``
does), or exit non-zero on a control-plane outage (it waits and keeps the overlay).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc

from certs import pki
from certs.files import read_file
from meshlet import discovery_client as dc
from meshlet.errors import InputError, MeshError
from meshlet.model import EventType, Kind, Node
from node import leases as lease_table
from node import plan, state
from node.netlink import Kernel, require_net_admin

log = logging.getLogger(__name__)

CLIENT_KIND = "node"
HEARTBEAT_S = 5.0
RESYNC_S = 30.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 15.0
TEARDOWN_CALL_TIMEOUT_S = 3.0
_RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL", "UNKNOWN"}


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    name: str
    control_plane: str
    ca_bundle: Path
    join_token: Path
    underlay_address: str
    underlay_dev: str | None = None
    vni: int = 4096
    port: int = 4789
    state_dir: Path = state.DEFAULT_DIR
    teardown_on_exit: bool = False
    heartbeat_s: float = HEARTBEAT_S
    resync_s: float = RESYNC_S


def backoff(attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**(attempt-1))]."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** min(attempt - 1, 30)) * rng.random()


def describe(op: plan.Op) -> str:
    """One short line per operation, for the log."""
    values = ", ".join(f"{f.name}={getattr(op, f.name)}" for f in dataclasses.fields(op))
    return f"{type(op).__name__}({values})"


class NodeHelper:
    def __init__(self, cfg: NodeConfig, kernel: Kernel, bundle_pem: bytes, token: str) -> None:
        self._cfg = cfg
        self._kernel = kernel
        self._bundle = bundle_pem
        self._token = token
        self._channel: grpc.aio.Channel | None = None
        self._channel_bundle = b""
        self._rng = random.Random()
        self._vtep_mac = plan.vtep_mac(cfg.underlay_address)
        self.node: Node | None = None
        self.nodes: dict[str, Node] | None = None  # None until the first map
        self.revision = 0
        self._dirty = asyncio.Event()
        self._reregister = asyncio.Event()
        self._written: state.NodeInfo | None = None
        self.synced = asyncio.Event()

    # ---- the control plane ------------------------------------------------------------------

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = dc.channel(
                self._cfg.control_plane, self._bundle, join_token=self._token
            )
            self._channel_bundle = self._bundle
        return self._channel

    async def refresh_channel(self) -> None:
        """A new channel when the control plane pushed a new trust bundle (before a reconnect)."""
        if self._channel is not None and self._channel_bundle != self._bundle:
            old, self._channel = self._channel, None
            await old.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def register(self) -> Node:
        node = await dc.register_node(
            dc.NodesStub(self.channel()),  # type: ignore[no-untyped-call]
            name=self._cfg.name,
            underlay_address=self._cfg.underlay_address,
            vtep_mac=self._vtep_mac,
        )
        if node.subnet is None:
            raise MeshError(f"the control plane registered node {node.name} without a subnet")
        if self.node is not None and self.node.subnet != node.subnet:
            log.warning(
                "the node's subnet changed: containers attached before keep their old addresses",
                extra={"old": self.node.subnet, "new": node.subnet},
            )
        self.node = node
        self._dirty.set()
        log.info(
            "node registered",
            extra={
                "node": node.name,
                "subnet": node.subnet,
                "underlay_address": node.underlay_address,
                "vtep_mac": node.vtep_mac,
            },
        )
        return node

    async def register_until_done(self) -> Node:
        """Register, waiting out a control plane that is not there yet; refusals are fatal."""
        attempt = 0
        while True:
            try:
                return await self.register()
            except dc.ControlPlaneError as e:
                if e.code not in _RETRYABLE:
                    raise
                attempt += 1
                wait = backoff(attempt, self._rng)
                log.warning(
                    "cannot register the node yet: %s",
                    e,
                    extra={"attempt": attempt, "retry_in_s": round(wait, 2)},
                )
                await asyncio.sleep(wait)

    async def heartbeat_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._cfg.heartbeat_s):
                    await self._reregister.wait()
            try:
                if self._reregister.is_set():
                    self._reregister.clear()
                    await self.register()
                    continue
                await dc.node_heartbeat(
                    dc.NodesStub(self.channel()),  # type: ignore[no-untyped-call]
                    self._cfg.name,
                )
            except dc.ControlPlaneError as e:
                if e.code == "NOT_FOUND":
                    log.warning("the control plane forgot this node: registering again")
                    self._reregister.set()
                else:
                    log.warning("heartbeat failed: %s", e)
            except MeshError as e:
                log.warning("registering the node again failed: %s", e)

    def apply_update(self, update: dc.Update) -> bool:
        """Take the nodes out of a Watch update; whether the map changed."""
        self.revision = update.revision
        if update.trust_bundle_pem and update.trust_bundle_pem != self._bundle:
            try:
                pki.load_certs(update.trust_bundle_pem, source="the pushed trust bundle")
                self._bundle = update.trust_bundle_pem  # used from the next connection on
                log.info("adopted the trust bundle the control plane pushed")
            except MeshError as e:
                log.warning("refused the trust bundle the control plane pushed: %s", e)
        if isinstance(update, dc.Reset):
            nodes = dict(update.snapshot.nodes)
        elif isinstance(update, dc.Delta) and self.nodes is not None:
            nodes = dict(self.nodes)
            for ev in update.events:
                if ev.kind is not Kind.NODE or not isinstance(ev.object, Node):
                    continue
                if ev.type is EventType.DELETED:
                    nodes.pop(ev.key, None)
                else:
                    nodes[ev.key] = ev.object
        else:
            return False
        changed = nodes != self.nodes
        self.nodes = nodes
        self._check_self(nodes)
        return changed

    def _check_self(self, nodes: dict[str, Node]) -> None:
        """Register again when the map lost this node or shows it with other addresses."""
        if self.node is None:
            return
        mine = nodes.get(self._cfg.name)
        if mine is None or (mine.underlay_address, mine.vtep_mac) != (
            self._cfg.underlay_address,
            self._vtep_mac,
        ):
            log.warning("the node map lost or changed this node: registering again")
            self._reregister.set()
        elif mine.subnet is not None:
            self.node = mine

    async def watch_forever(self) -> None:
        attempt = 0
        while True:
            heard = False
            try:
                request = dc.watch_request(
                    client_id=f"node:{self._cfg.name}",
                    kind=CLIENT_KIND,
                    since_revision=self.revision if self.nodes is not None else 0,
                    bundle_pem=self._bundle,
                )
                await self.refresh_channel()
                stub = dc.DiscoveryStub(self.channel())  # type: ignore[no-untyped-call]
                async for update in dc.watch(stub, request):
                    if not heard:
                        log.info("watching the node map", extra={"since": request.since_revision})
                        heard = True
                        self._dirty.set()  # re-sync after every reconnect
                    if self.apply_update(update):
                        self._dirty.set()
                error = "the control plane ended the watch stream"
            except MeshError as e:  # unreachable, refused, or sent something undecodable
                error = str(e)
            attempt = 1 if heard else attempt + 1
            wait = backoff(attempt, self._rng)
            log.warning(
                "lost the control plane; the overlay stays as it is: %s",
                error,
                extra={"revision": self.revision, "attempt": attempt, "retry_in_s": round(wait, 2)},
            )
            await asyncio.sleep(wait)

    # ---- the kernel -------------------------------------------------------------------------

    async def sync(self) -> list[plan.Op]:
        """Make the kernel match the node map; the operations it took."""
        assert self.node is not None and self.node.subnet is not None and self.nodes is not None
        cfg = self._cfg
        index, mtu = await self._kernel.underlay(cfg.underlay_address, cfg.underlay_dev)
        local = plan.LocalNode(
            name=cfg.name,
            underlay_address=cfg.underlay_address,
            underlay_index=index,
            underlay_mtu=mtu,
            vni=cfg.vni,
            port=cfg.port,
            subnet=self.node.subnet,
        )
        desired = plan.desired_state(local, self.nodes.values())
        ops = plan.plan(await self._kernel.read_state(), desired)
        for op in ops:
            await self._kernel.apply(op)
        peers = plan.peers(local, self.nodes.values())
        if ops:
            log.info(
                "overlay synced",
                extra={
                    "operations": len(ops),
                    "changes": [describe(op) for op in ops],
                    "peers": [p.name for p in peers],
                },
            )
        self._write_info(local)
        self.synced.set()
        return ops

    def _write_info(self, local: plan.LocalNode) -> None:
        info = state.NodeInfo(
            pid=os.getpid(),
            name=local.name,
            subnet=local.subnet,
            gateway=plan.gateway(local.subnet),
            bridge=plan.BRIDGE,
            vxlan=plan.VXLAN,
            vtep_mac=self._vtep_mac,
            mtu=local.mtu,
            underlay_address=local.underlay_address,
            vni=local.vni,
            port=local.port,
        )
        if info != self._written:
            state.write_info(self._cfg.state_dir, info)
            self._written = info
            log.info(
                "overlay up",
                extra={
                    "state_file": str(state.info_path(self._cfg.state_dir, local.name)),
                    "subnet": local.subnet,
                },
            )

    async def sync_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._cfg.resync_s):
                    await self._dirty.wait()
            self._dirty.clear()
            if self.nodes is None or self.node is None:
                continue  # nothing is changed before the first node map
            try:
                await self.sync()
            except MeshError as e:
                if not self.synced.is_set():
                    raise  # the first sync failing is fatal: the overlay cannot be built
                log.error("overlay sync failed; retrying at the next change or resync: %s", e)

    async def serve(self) -> None:
        await self.register_until_done()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.watch_forever())
            tg.create_task(self.heartbeat_forever())
            tg.create_task(self.sync_forever())

    async def teardown(self) -> None:
        """Leave: deregister, remove the overlay, the containers' veths and the state files."""
        cfg = self._cfg
        try:
            await dc.deregister_node(
                dc.NodesStub(self.channel()),  # type: ignore[no-untyped-call]
                cfg.name,
                timeout_s=TEARDOWN_CALL_TIMEOUT_S,
            )
            log.info("node deregistered", extra={"node": cfg.name})
        except dc.ControlPlaneError as e:
            if e.code != "NOT_FOUND":
                log.warning("cannot deregister the node (the others keep its routes): %s", e)
        current = await self._kernel.read_state()
        ops = plan.plan(current, plan.teardown_state(current))
        for op in ops:
            await self._kernel.apply(op)
        path = state.leases_path(cfg.state_dir, cfg.name)
        with contextlib.suppress(FileNotFoundError, MeshError):
            table = lease_table.decode(path.read_bytes(), source=str(path))
            for lease in table.by_netns.values():
                await self._kernel.delete_link(lease.host_interface)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        state.remove_info(cfg.state_dir, cfg.name)
        log.info("overlay removed", extra={"operations": [describe(op) for op in ops]})


async def run(cfg: NodeConfig, stop: asyncio.Event | None = None) -> None:
    require_net_admin("meshlet node run")
    bundle = read_file(cfg.ca_bundle, what="--ca-bundle")
    token = read_file(cfg.join_token, what="--join-token").decode(errors="replace").strip()
    if not token:
        raise InputError(f"--join-token {cfg.join_token} is empty: use DATA_DIR/join-token")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Kernel() as kernel:
        await kernel.underlay(cfg.underlay_address, cfg.underlay_dev)  # a wrong flag fails now
        helper = NodeHelper(cfg, kernel, bundle, token)
        log.info(
            "node helper starting",
            extra={
                "node": cfg.name,
                "control_plane": cfg.control_plane,
                "underlay_address": cfg.underlay_address,
                "vni": cfg.vni,
            },
        )
        try:
            serving = asyncio.ensure_future(helper.serve())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (serving, stopping):
                    task.cancel()
                results = await asyncio.gather(serving, stopping, return_exceptions=True)
            error = results[0]
            if isinstance(error, BaseExceptionGroup):
                error = _first_mesh_error(error)
            if isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
                raise error
            if cfg.teardown_on_exit:
                await helper.teardown()
            log.info(
                "node helper stopped", extra={"node": cfg.name, "teardown": cfg.teardown_on_exit}
            )
        finally:
            await helper.close()


def _first_mesh_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """A TaskGroup wraps what failed; the first MeshError in it is what the user needs."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            error = _first_mesh_error(error)
        if isinstance(error, MeshError):
            return error
    return group
