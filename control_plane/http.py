"""HTTP plumbing for the admin API: JSON errors, bearer auth, body limits, blocking
queries and the NDJSON watch stream. No routes live here (see ``api``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from control_plane.core import ControlPlane
from control_plane.store.base import CompactedError
from meshlet import wire
from meshlet.durations import parse_duration
from meshlet.errors import ConflictError, InputError, MeshError, NotFoundError
from meshlet.model import Event, EventType, Kind

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # 1 MiB: a service with hundreds of routes fits easily
MAX_WAIT_S = 300.0  # blocking queries hold at most 5 minutes (Consul's cap is 10)
DEFAULT_WAIT_S = 30.0
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dumps(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def json_response(
    data: Any,
    *,
    status: int = 200,
    revision: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    hdrs = dict(headers or {})
    if revision is not None:
        hdrs["X-Mesh-Index"] = str(revision)
    return web.Response(
        body=dumps(data), status=status, content_type="application/json", headers=hdrs
    )


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return json_response({"error": {"code": code, "message": message, **extra}}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CompactedError as e:
        return error_response(410, "compacted", str(e), revision=e.current)
    except NotFoundError as e:
        return error_response(404, "not_found", str(e))
    except InputError as e:
        return error_response(400, "invalid", str(e))
    except ConflictError as e:
        return error_response(409, "conflict", str(e))
    except MeshError as e:
        log.error("request failed", extra={"path": request.path, "error": str(e)})
        return error_response(500, "internal", str(e))
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "too_large", f"the request body is larger than {MAX_BODY} bytes")
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(
                e.status,
                e.reason.lower().replace(" ", "_"),
                f"{e.reason}: {request.method} {request.path}",
            )
        raise


def auth(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            reason = "missing" if not given else "wrong"
            resp = error_response(
                401,
                "unauthorized",
                f"{reason} admin token: send 'Authorization: Bearer <token>' with the token "
                "from DATA_DIR/admin-token",
            )
            resp.headers["WWW-Authenticate"] = 'Bearer realm="meshlet"'
            return resp
        return await handler(request)

    return middleware


async def read_json(request: web.Request) -> Any:
    if not request.can_read_body:
        raise InputError(f"{request.method} {request.path} needs a JSON body")
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InputError(f"the request body is not valid JSON: {e}") from None


def int_param(request: web.Request, name: str, default: int | None = None) -> int | None:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"query parameter {name}={value!r} is not a whole number") from None
    if number < 0:
        raise InputError(f"query parameter {name}={value!r} must not be negative")
    return number


async def block(request: web.Request, cp: ControlPlane, rng: random.Random) -> int:
    """Consul's blocking query: with ``?index=N`` hold until the revision passes N or the
    wait (``?wait=30s``, capped at 5 min, plus up to 1/16 jitter) ends."""
    index = int_param(request, "index")
    if index is None:
        return cp.revision
    wait_s = DEFAULT_WAIT_S
    if "wait" in request.query:
        wait_s = parse_duration(request.query["wait"], what="query parameter wait")
    wait_s = min(wait_s, MAX_WAIT_S)
    wait_s += rng.uniform(0, wait_s / 16)
    return await cp.wait_for(index, wait_s)


def event_data(ev: Event) -> dict[str, Any]:
    return {
        "type": ev.type.value,
        "kind": ev.kind.value,
        "key": ev.key,
        "revision": ev.revision,
        "object": wire.to_data(ev.object),
    }


async def _pump(
    source: AsyncIterator[list[Event]], queue: asyncio.Queue[list[Event] | BaseException]
) -> None:
    try:
        async for batch in source:
            await queue.put(batch)
    except BaseException as e:  # handed to the consumer, which re-raises it
        await queue.put(e)
        if isinstance(e, asyncio.CancelledError):
            raise


async def watch_stream(
    request: web.Request,
    cp: ControlPlane,
    kinds: frozenset[Kind],
    *,
    bookmark_s: float,
) -> web.StreamResponse:
    """``?watch=1[&since=REV]`` as newline-delimited JSON events, with BOOKMARKs.

    Without ``since`` the stream starts with the current objects as ADDED; with it, with
    exactly the changes after REV, or 410 when REV has been compacted (list again)."""
    since = int_param(request, "since")
    initial: list[Event] = []
    if since is None:
        snap = cp.snapshot
        since = snap.revision
        for kind in sorted(kinds):
            for key in sorted(snap.table(kind)):
                initial.append(
                    Event(type=EventType.ADDED, object=snap.table(kind)[key], revision=since)
                )
    source = cp.watch(since)
    queue: asyncio.Queue[list[Event] | BaseException] = asyncio.Queue(maxsize=64)
    # Surface a compacted revision as 410 before the 200 goes out.
    first: list[Event] | BaseException | None = None
    pump = asyncio.create_task(_pump(source, queue))
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                first = await queue.get()
        if isinstance(first, BaseException):
            raise first
        resp = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "X-Mesh-Index": str(cp.revision)}
        )
        await resp.prepare(request)
        batches = [initial] if initial else []
        if first:
            batches.append(first)
        while True:
            for batch in batches:
                lines = b"".join(dumps(event_data(e)) + b"\n" for e in batch if e.kind in kinds)
                if lines:
                    await resp.write(lines)
            batches = []
            try:
                async with asyncio.timeout(bookmark_s):
                    item = await queue.get()
            except TimeoutError:
                await resp.write(dumps({"type": "BOOKMARK", "revision": cp.revision}) + b"\n")
                continue
            if isinstance(item, CompactedError):
                await resp.write(
                    dumps(
                        {
                            "type": "ERROR",
                            "code": "compacted",
                            "message": str(item),
                            "revision": item.current,
                        }
                    )
                    + b"\n"
                )
                return resp
            if isinstance(item, BaseException):
                raise item
            batches = [item]
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
