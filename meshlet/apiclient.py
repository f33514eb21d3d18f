"""A small synchronous client for the control plane's admin REST API.

Built on urllib.request so the CLI starts fast and needs no extra dependency. It
speaks JSON, sends the bearer token, puts a timeout on every request and turns every
failure into one ``MeshError`` whose message names the address and what to do:
unreachable → ``UnreachableError``, 401 → ``AuthError``, 404 → ``NotFoundError``,
400/413 → ``InputError``, 409 → ``ConflictError``, anything else → ``ServerError``.
It never decides anything about the mesh; the CLI (``meshlet.ctl``) does.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from typing import Any, NamedTuple

from meshlet.errors import ConflictError, InputError, MeshError, NotFoundError

DEFAULT_SERVER = "http://127.0.0.1:15080"
DEFAULT_TIMEOUT_S = 10.0
TOKEN_HELP = (
    "pass --token or --token-file, or set MESHLET_TOKEN or MESHLET_TOKEN_FILE "
    "(the token is in the control plane's DATA_DIR/admin-token)"
)


class UnreachableError(MeshError):
    """The control plane could not be reached (refused, timed out, not HTTP)."""


class AuthError(MeshError):
    """The control plane refused the admin token (401). Nothing was changed."""


class ServerError(MeshError):
    """The control plane answered with an error the CLI has no better name for (5xx, 410)."""


class Response(NamedTuple):
    status: int
    headers: Message  # case-insensitive: headers["X-Mesh-Index"]
    data: Any  # the decoded JSON body

    @property
    def revision(self) -> int | None:
        value = self.headers.get("X-Mesh-Index")
        return int(value) if value and value.isdigit() else None


def normalize_server(text: str) -> str:
    """``http(s)://HOST:PORT[/prefix]``, ``HOST:PORT`` or ``:PORT`` → a base URL."""
    raw = text.strip()
    if not raw:
        raise InputError("--server is empty: use a URL like http://127.0.0.1:15080")
    if "://" not in raw:
        raw = "http://" + ("127.0.0.1" + raw if raw.startswith(":") else raw)
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise InputError(f"--server {text!r}: use http:// or https://, like {DEFAULT_SERVER}")
    try:
        port = parts.port
    except ValueError:
        raise InputError(f"--server {text!r}: the port is not a number in 1-65535") from None
    if not parts.hostname or port == 0 or parts.query or parts.fragment:
        raise InputError(f"--server {text!r} is not an address like {DEFAULT_SERVER}")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


class ApiClient:
    """``ApiClient("http://127.0.0.1:15080", token).get("/v1/services")`` → Response."""

    def __init__(
        self, server: str, token: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.base = normalize_server(server)
        self.token = token
        self.timeout_s = timeout_s
        # The admin API is internal: talk to it directly, never through an HTTP(S)_PROXY.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, query: dict[str, str] | None = None) -> Response:
        return self.request("GET", path, query=query)

    def put(self, path: str, body: Any = None) -> Response:
        return self.request("PUT", path, body)

    def post(self, path: str, body: Any = None) -> Response:
        return self.request("POST", path, body)

    def delete(self, path: str) -> Response:
        return self.request("DELETE", path)

    def request(
        self, method: str, path: str, body: Any = None, *, query: dict[str, str] | None = None
    ) -> Response:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json", "User-Agent": "meshlet-cli"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        where = f"{method} {path}"
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                return Response(resp.status, resp.headers, self._decode(resp.read(), where))
        except urllib.error.HTTPError as e:
            with e:
                raw = _read_quietly(e)
            raise self._http_error(e.code, raw, where) from None
        except urllib.error.URLError as e:
            raise self._unreachable(e.reason) from None
        except (TimeoutError, OSError) as e:  # a timeout or reset while reading the answer
            raise self._unreachable(e) from None

    # ---- error translation ------------------------------------------------------------------

    def _unreachable(self, reason: object) -> UnreachableError:
        if isinstance(reason, TimeoutError):
            why = f"no answer within {self.timeout_s:g}s"
        elif isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, ConnectionResetError):
            why = "connection reset"
        elif isinstance(reason, socket.gaierror):
            why = f"cannot resolve the host name: {reason.strerror}"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror.lower()
        else:
            why = str(reason) or type(reason).__name__
        return UnreachableError(
            f"cannot reach the control plane at {self.base} ({why}): is "
            "`meshlet control-plane run` running? set --server or MESHLET_SERVER"
        )

    def _decode(self, raw: bytes, where: str) -> Any:
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise UnreachableError(
                f"{self.base} answered {where} with something other than JSON: is it the "
                "control plane's admin API (--api of `meshlet control-plane run`)?"
            ) from None

    def _http_error(self, status: int, raw: bytes, where: str) -> MeshError:
        try:
            error = json.loads(raw)["error"]
            message = str(error["message"])
        except (ValueError, KeyError, TypeError):
            snippet = raw[:120].decode("utf-8", "replace").strip().replace("\n", " ")
            return UnreachableError(
                f"{self.base} answered {where} with HTTP {status} and no meshlet error "
                f"({snippet or 'empty body'}): is it the control plane's admin API?"
            )
        if status == 401:
            if not self.token:
                return AuthError(
                    f"the control plane at {self.base} needs an admin token: {TOKEN_HELP}"
                )
            return AuthError(
                f"the control plane at {self.base} refused the admin token: {TOKEN_HELP}"
            )
        if status == 404:
            return NotFoundError(message)
        if status in (400, 413):
            return InputError(message)
        if status == 409:
            return ConflictError(message)
        return ServerError(f"the control plane answered {where} with HTTP {status}: {message}")


def _read_quietly(e: urllib.error.HTTPError) -> bytes:
    try:
        return e.read()
    except OSError:
        return b""
