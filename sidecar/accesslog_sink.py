"""Where the L7 access log goes: stdout (the default, as Envoy's ``/dev/stdout``), a file,
or nowhere. The edge that owns the stream for ``sidecar.accesslog``.

Cheap on the request path: ``write`` renders one line (``accesslog.render``) and
appends it to a list; the lines of one event-loop turn leave in one ``os.write``.
A stream that fails (a closed pipe, a full disk) is reported once and turned off, so
logging never takes the proxy down.

Must never: block on anything but the write itself, or raise into the request path.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from sidecar.accesslog import AccessLogEntry, render

log = logging.getLogger(__name__)

STDOUT = "-"
OFF = "off"


class AccessLogSink:
    def __init__(self, target: str = STDOUT) -> None:
        self.target = target
        self._fd: int | None = None
        self._own = False
        if target == STDOUT:
            self._fd = 1
        elif target != OFF:
            self._fd = os.open(Path(target), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._own = True
        self._lines: list[bytes] = []
        self._scheduled = False
        self.written = 0

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def write(self, entry: AccessLogEntry) -> None:
        if self._fd is None:
            return
        self._lines.append(render(entry))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines or self._fd is None:
            self._lines.clear()
            return
        data = memoryview(b"".join(self._lines))
        count = len(self._lines)
        self._lines.clear()
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as e:
            log.warning(
                "the access log cannot be written; turning it off",
                extra={"target": self.target, "error": str(e)},
            )
            self._fd = None
            return
        self.written += count

    def close(self) -> None:
        self.flush()
        if self._own and self._fd is not None:
            os.close(self._fd)
        self._fd = None
