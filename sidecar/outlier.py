"""Outlier detection for one upstream service, with Envoy's consecutive-failure rules.

The shell reports each result with ``record(key, ok)``: a failed connect or TLS
handshake at L4, a 5xx/gateway error or reset at L7. After ``consecutive_failures``
failures in a row the endpoint is ejected: left out of balancing until its ejection
ends. ``available(keys)`` says what to balance over right now.

Rules (defaults from REFERENCE.md, figures from ``OutlierDetection``):

- The n-th ejection of an endpoint lasts ``base_ejection_s * 2**(n-1)``, at most
  ``MAX_EJECTION_S`` (Envoy's ``max_ejection_time``, 300 s; or the base, if larger).
- When an ejection ends the endpoint returns with a clean failure count. Its ejection
  count decays: it drops by one for every full ``base_ejection_s`` the endpoint stays in
  rotation, so a host that failed once long ago starts again at the base time, while a
  flapping host keeps its longer ejections.
- Never more than ``max_ejection_percent`` of the service's endpoints are ejected at
  once, but one always may be. Beyond the cap a failing endpoint stays in rotation; the
  refusal is counted (``overflow_total``, Envoy's ``ejections_overflow``) and its
  next failure tries again, so it is ejected as soon as a slot frees.
- Panic: when the share of endpoints not ejected is below ``panic_threshold_percent``,
  or none is left, ``available`` returns them all with ``panic=True``; sending to a
  sick host beats sending nowhere.
- Results that arrive while an endpoint is ejected (requests already in flight) do not
  extend its ejection.

The service's size, for the cap, is the number of endpoints the detector knows: every
key given to ``available`` or ``record`` and not yet ``forget``-ed. A forgotten
endpoint that comes back starts clean.

Pure: time from the injected clock (monotonic seconds); never imports asyncio, socket
or ssl, never reads ``time`` or ``random``, never logs (it returns ``Ejection`` events).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshlet.policy import OutlierDetection
from meshlet.runtime import Clock

MAX_EJECTION_S = 300.0
_MAX_DOUBLINGS = 30


@dataclass(frozen=True, slots=True, kw_only=True)
class Ejection:
    """Returned by ``record`` when that failure ejected the endpoint."""

    key: str
    until: float  # on the detector's monotonic clock
    count: int  # the how-many-th ejection this is (after decay)
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    keys: tuple[str, ...]  # what to balance over
    panic: bool  # True: too few endpoints left, ``keys`` is every endpoint given
    ejected: tuple[str, ...]  # of the keys given, those ejected right now


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointState:
    """One endpoint as the admin /clusters view shows it."""

    key: str
    ejected_until: float | None  # monotonic; None when in rotation
    consecutive_failures: int
    ejection_count: int  # after decay
    cap_refusals: int  # failures that would have ejected it but for max_ejection_percent


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorStats:
    endpoints: int
    ejected: int
    ejections_total: int
    overflow_total: int


class _Host:
    __slots__ = ("cap_refusals", "count", "failures", "returned_at")

    def __init__(self) -> None:
        self.failures = 0
        self.count = 0  # ejections, before decay since returned_at
        self.returned_at = 0.0
        self.cap_refusals = 0


class OutlierDetector:
    """Consecutive-failure ejection over the endpoints of one upstream service."""

    __slots__ = (
        "_cache_keys",
        "_cache_sel",
        "_cache_version",
        "_clock",
        "_ejected",
        "_ejections",
        "_hosts",
        "_next_expiry",
        "_overflows",
        "_policy",
        "_version",
    )

    def __init__(self, policy: OutlierDetection, clock: Clock) -> None:
        self._policy = policy
        self._clock = clock
        self._hosts: dict[str, _Host] = {}
        self._ejected: dict[str, float] = {}  # key → until
        self._next_expiry = math.inf
        self._version = 0  # bumped whenever the ejected set changes
        self._cache_keys: tuple[str, ...] | None = None
        self._cache_version = -1
        self._cache_sel = Selection(keys=(), panic=False, ejected=())
        self._ejections = 0
        self._overflows = 0

    # -- time ------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        for key, until in list(self._ejected.items()):
            if until <= now:
                del self._ejected[key]
                self._hosts[key].returned_at = until
        self._next_expiry = min(self._ejected.values(), default=math.inf)
        self._version += 1

    def _decayed_count(self, host: _Host, now: float) -> int:
        if host.count == 0:
            return 0
        periods = int((now - host.returned_at) // self._policy.base_ejection_s)
        return max(0, host.count - max(0, periods))

    def _cap(self) -> int:
        return max(1, len(self._hosts) * self._policy.max_ejection_percent // 100)

    # -- the data path -----------------------------------------------------------------

    def record(self, key: str, ok: bool) -> Ejection | None:
        """Count one result for ``key``; an ``Ejection`` if this failure ejected it."""
        now = self._clock.monotonic()
        self._expire(now)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host()
        if ok:
            host.failures = 0
            return None
        if key in self._ejected:
            return None  # a request that was already in flight: the ejection stands
        host.failures += 1
        if host.failures < self._policy.consecutive_failures:
            return None
        if len(self._ejected) >= self._cap():
            host.cap_refusals += 1
            self._overflows += 1
            return None
        count = self._decayed_count(host, now) + 1
        base = self._policy.base_ejection_s
        duration = min(base * 2.0 ** min(count - 1, _MAX_DOUBLINGS), max(MAX_EJECTION_S, base))
        until = now + duration
        host.count = count
        host.failures = 0
        self._ejected[key] = until
        self._next_expiry = min(self._next_expiry, until)
        self._version += 1
        self._ejections += 1
        return Ejection(key=key, until=until, count=count, duration_s=duration)

    def available(self, keys: Sequence[str]) -> Selection:
        """The endpoints to balance over, out of ``keys`` (the service's healthy ones).

        Passing the same tuple again (one per catalog revision) is O(1) while no
        ejection starts or ends.
        """
        if self._ejected:
            self._expire(self._clock.monotonic())
        if self._cache_version == self._version and (
            keys is self._cache_keys or (type(keys) is tuple and keys == self._cache_keys)
        ):
            return self._cache_sel
        given = tuple(keys)
        hosts = self._hosts
        for key in given:
            if key not in hosts:
                hosts[key] = _Host()
        ejected_map = self._ejected
        if not ejected_map:
            sel = Selection(keys=given, panic=False, ejected=())
        else:
            ejected = tuple(k for k in given if k in ejected_map)
            if not ejected:
                sel = Selection(keys=given, panic=False, ejected=())
            else:
                left = tuple(k for k in given if k not in ejected_map)
                panic = not left or len(left) * 100 < (
                    self._policy.panic_threshold_percent * len(given)
                )
                sel = Selection(keys=given if panic else left, panic=panic, ejected=ejected)
        self._cache_keys, self._cache_version, self._cache_sel = given, self._version, sel
        return sel

    # -- membership and views ------------------------------------------------------------

    def forget(self, keys: Iterable[str]) -> None:
        """Drop every trace of endpoints that left the service."""
        changed = False
        for key in keys:
            if self._hosts.pop(key, None) is not None:
                changed = True
            if self._ejected.pop(key, None) is not None:
                changed = True
        if changed:
            self._next_expiry = min(self._ejected.values(), default=math.inf)
            self._version += 1

    def state(self, key: str) -> EndpointState | None:
        """What the detector knows of ``key``; None if it knows nothing."""
        now = self._clock.monotonic()
        self._expire(now)
        host = self._hosts.get(key)
        if host is None:
            return None
        return EndpointState(
            key=key,
            ejected_until=self._ejected.get(key),
            consecutive_failures=host.failures,
            ejection_count=(host.count if key in self._ejected else self._decayed_count(host, now)),
            cap_refusals=host.cap_refusals,
        )

    def ejected(self) -> tuple[str, ...]:
        """Every endpoint ejected right now, sorted."""
        self._expire(self._clock.monotonic())
        return tuple(sorted(self._ejected))

    def stats(self) -> DetectorStats:
        self._expire(self._clock.monotonic())
        return DetectorStats(
            endpoints=len(self._hosts),
            ejected=len(self._ejected),
            ejections_total=self._ejections,
            overflow_total=self._overflows,
        )
