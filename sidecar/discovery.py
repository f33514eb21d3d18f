"""The sidecar's live copy of the mesh map: a Watch on the control plane's mTLS port,
applied into a Snapshot and published as an immutable Catalog, and kept on disk.

``load_cache()`` serves the last map written to ``cache_path`` before the control plane
answers (or while it is down: Envoy keeps its last config, and so do we, across
restarts). ``run()`` watches from the last applied revision, so a reconnect gets only
what it missed; it adopts the trust bundle the control plane pushes (``Identity``) and
reports what it runs; after any failure it reconnects with full-jitter backoff.

This module never drops the map it has (losing the control plane changes nothing for
traffic), never raises out of ``run()``, and never writes the cache in place or more
than once per ``cache_interval_s`` (the latest map always gets written).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, cast

import orjson

from certs.files import write_files
from meshlet import discovery_client as dc
from meshlet import wire
from meshlet.errors import InputError, MeshError
from meshlet.model import Endpoint, Node, Service, Snapshot, key_of
from meshlet.proto import mesh_pb2
from meshlet.runtime import Clock
from sidecar import backoff
from sidecar.catalog import Catalog
from sidecar.identity import Contexts, Identity

log = logging.getLogger(__name__)

CLIENT_KIND = "sidecar"
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
CACHE_INTERVAL_S = 1.0
CACHE_MODE = 0o600
_TABLES: tuple[tuple[str, type[Any]], ...] = (
    ("services", Service),
    ("endpoints", Endpoint),
    ("nodes", Node),
)


# ---- the cache file: pure encode/decode ---------------------------------------------------


def encode_cache(snapshot: Snapshot) -> bytes:
    """``{"revision", "services", "endpoints", "nodes"}``, objects in their wire shape."""
    body: dict[str, Any] = {"revision": snapshot.revision}
    for name, _ in _TABLES:
        table = getattr(snapshot, name)
        body[name] = [wire.to_data(table[k]) for k in sorted(table)]
    return orjson.dumps(body)


def decode_cache(raw: bytes, *, source: str) -> Snapshot:
    """The Snapshot in a cache file; InputError saying what is wrong with it."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InputError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InputError(f"{source} is not a JSON object")
    revision = body.get("revision")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise InputError(f"{source}: revision {revision!r} is not a revision")
    tables: dict[str, dict[str, Any]] = {}
    for name, cls in _TABLES:
        items = body.get(name, [])
        if not isinstance(items, list):
            raise InputError(f"{source}: {name} is not a list")
        objs = (
            wire.from_data(cls, item, what=f"{source} {name}.{i}") for i, item in enumerate(items)
        )
        tables[name] = {key_of(o): o for o in objs}
    return Snapshot(revision=revision, **tables)


# ---- the watcher ------------------------------------------------------------------------------


class Discovery:
    """Watches the control plane for one sidecar; run ``run()`` in a TaskGroup."""

    def __init__(
        self,
        identity: Identity,
        *,
        control_plane_mtls: str,
        client_id: str,
        cache_path: Path,
        clock: Clock,
        rng: random.Random,
        on_catalog: Callable[[Catalog], None] | None = None,
        idle_timeout_s: float = dc.IDLE_TIMEOUT_S,
        cache_interval_s: float = CACHE_INTERVAL_S,
    ) -> None:
        self._identity = identity
        self._address = control_plane_mtls
        self._client_id = client_id
        self._cache_path = Path(cache_path)
        self._clock = clock
        self._rng = rng
        self._on_catalog = on_catalog
        self._idle_timeout_s = idle_timeout_s
        self._cache_interval_s = cache_interval_s
        self._snapshot: Snapshot | None = None
        self._catalog = Catalog()
        self._last_update: float | None = None
        self._heard = False  # the current stream has delivered something
        self._identity_changed = asyncio.Event()
        self._dirty = asyncio.Event()
        self._cache_lock = threading.Lock()  # the writer thread vs. a final flush
        self._cached: Snapshot | None = None  # the map last written (or read) on disk
        self.first_snapshot = asyncio.Event()  # set by a cache load or the first Reset
        self.connected = False
        self.reconnects = 0  # streams lost (not counting reconnects for a new certificate)
        self.updates = 0  # Resets + Deltas applied
        self.resets = 0
        self.deltas = 0
        self.bookmarks = 0
        self.reports = 0
        self.cache_writes = 0

    # ---- views ------------------------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def revision(self) -> int:
        """The revision of the map in use (0 when there is none)."""
        return self._snapshot.revision if self._snapshot is not None else 0

    @property
    def last_update_age(self) -> float | None:
        """Seconds since the control plane last said anything (a Bookmark counts)."""
        if self._last_update is None:
            return None
        return self._clock.monotonic() - self._last_update

    # ---- the cache ----------------------------------------------------------------------------

    def load_cache(self) -> Catalog | None:
        """Serve the map saved in ``cache_path``; None (logged) when missing or unreadable."""
        try:
            raw = self._cache_path.read_bytes()
        except FileNotFoundError:
            log.info("no discovery cache yet", extra={"path": str(self._cache_path)})
            return None
        except OSError as e:
            log.warning("cannot read the discovery cache %s: %s", self._cache_path, e.strerror)
            return None
        try:
            snapshot = decode_cache(raw, source=str(self._cache_path))
        except MeshError as e:
            log.warning("ignoring a corrupt discovery cache: %s", e)
            return None
        if self._snapshot is not None and self._snapshot.revision >= snapshot.revision:
            return self._catalog  # what we have is newer
        self._snapshot = self._cached = snapshot
        self._publish(snapshot)
        self.first_snapshot.set()
        log.info(
            "serving the cached mesh map",
            extra={"revision": snapshot.revision, "services": len(snapshot.services)},
        )
        return self._catalog

    def _write_cache(self, snapshot: Snapshot) -> None:
        """Runs in a worker thread (or at shutdown); one writer at a time."""
        with self._cache_lock:
            if snapshot is self._cached:
                return
            directory = self._cache_path.parent
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_files(directory, {self._cache_path.name: (encode_cache(snapshot), CACHE_MODE)})
            self._cached = snapshot
            self.cache_writes += 1

    async def _persist(self) -> None:
        """Write the latest map whenever it changed, at most once per cache interval."""
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                if (snapshot := self._snapshot) is not None:
                    try:
                        await asyncio.to_thread(self._write_cache, snapshot)
                    except Exception as e:  # a full disk must not stop discovery
                        log.warning("cannot write the discovery cache: %s", e)
                await asyncio.sleep(self._cache_interval_s)
        finally:
            if self._dirty.is_set() and self._snapshot is not None:
                with contextlib.suppress(Exception):
                    self._write_cache(self._snapshot)

    # ---- the watch -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch, apply, publish and persist until cancelled; never raises."""
        unsubscribe = self._identity.subscribe(self._on_identity)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._persist())
                await self._watch_forever()
        finally:
            unsubscribe()
            self.connected = False

    def _on_identity(self, _contexts: Contexts) -> None:
        self._identity_changed.set()

    async def _watch_forever(self) -> None:
        attempt = 0
        while True:
            self._identity_changed.clear()
            self._heard = False
            try:
                if await self._session():
                    continue  # a new certificate or bundle: reconnect with it at once
                error = "the control plane ended the watch stream"
            except dc.ControlPlaneError as e:
                error = str(e)
            except Exception as e:
                error = str(e) or type(e).__name__
                if not isinstance(e, MeshError):
                    log.warning("discovery stream failed", exc_info=True)
            self.connected = False
            self.reconnects += 1
            attempt = 1 if self._heard else attempt + 1
            wait = backoff.delay(attempt, BACKOFF_BASE_S, BACKOFF_MAX_S, self._rng)
            log.warning(
                "lost the control plane; serving the last map: %s",
                error,
                extra={"revision": self.revision, "attempt": attempt, "retry_in_s": round(wait, 2)},
            )
            with contextlib.suppress(TimeoutError):  # a new certificate is worth a try at once
                async with asyncio.timeout(wait):
                    await self._identity_changed.wait()

    async def _session(self) -> bool:
        """One Watch; True when it ended because our identity changed (after reporting it)."""
        channel = self._identity.channel(self._address)
        try:
            stub = dc.DiscoveryStub(channel)  # type: ignore[no-untyped-call]
            consume = asyncio.ensure_future(self._consume(stub))
            changed = asyncio.ensure_future(self._identity_changed.wait())
            try:
                await asyncio.wait({consume, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (consume, changed):
                    task.cancel()
                await asyncio.gather(consume, changed, return_exceptions=True)
            if not consume.cancelled():
                consume.result()  # the stream's error, or its end
                return False
            await self._report(stub)
            return True
        finally:
            await channel.close()

    def _request(self) -> mesh_pb2.WatchRequest:
        return dc.watch_request(
            client_id=self._client_id,
            kind=CLIENT_KIND,
            since_revision=self.revision,
            bundle_pem=self._identity.bundle_pem,
            leaf_chain_pem=self._identity.leaf_chain_pem,
        )

    async def _consume(self, stub: dc.DiscoveryStub) -> None:
        watch = dc.watch(stub, self._request(), idle_timeout_s=self._idle_timeout_s)
        async with contextlib.aclosing(cast(AsyncGenerator[dc.Update], watch)) as updates:
            async for update in updates:
                if not self._heard:
                    log.info("watching the control plane", extra={"since": self.revision})
                self._heard = True
                self.connected = True
                self._last_update = self._clock.monotonic()
                self._apply(update)
                if update.trust_bundle_pem:
                    try:
                        self._identity.set_bundle(update.trust_bundle_pem)
                    except MeshError as e:
                        log.warning("refused the trust bundle the control plane pushed: %s", e)

    async def _report(self, stub: dc.DiscoveryStub) -> None:
        """Tell the control plane which leaf and bundle we run now."""
        try:
            await dc.report(stub, self._request())
            self.reports += 1
        except MeshError as e:
            log.warning("cannot report our identity to the control plane: %s", e)

    def _apply(self, update: dc.Update) -> None:
        snapshot = dc.apply_update(self._snapshot, update)
        self._snapshot = snapshot
        if isinstance(update, dc.Bookmark):
            self.bookmarks += 1
            return
        if isinstance(update, dc.Reset):
            self.resets += 1
        else:
            self.deltas += 1
        self.updates += 1
        self._publish(snapshot)
        self._dirty.set()
        self.first_snapshot.set()
        log.debug("mesh map updated", extra={"revision": snapshot.revision})

    def _publish(self, snapshot: Snapshot) -> None:
        self._catalog = Catalog.from_snapshot(snapshot)
        if self._on_catalog is not None:
            try:
                self._on_catalog(self._catalog)
            except Exception:
                log.exception("the catalog listener failed")
