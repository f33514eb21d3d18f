"""Load balancers: which endpoint of a service gets the next connection or request.

One instance per upstream service, picking among the endpoint keys the caller passes
each time (the outlier detector's ``Selection.keys``), so membership lives in one place.
``pick(candidates, *, exclude=(), hash_key=None)`` returns a key, or None when nothing
is left after ``exclude`` (how a retry avoids the endpoint that just failed);
``on_start``/``on_finish`` feed outstanding counts and latency back; ``forget`` drops
endpoints that left. Algorithms: ``RoundRobin``, ``LeastRequest``, ``P2CPeakEwma``
(Linkerd's and Finagle's default), ``RingHash`` (ketama).

Pure and cheap: a pick allocates nothing that grows with the number of endpoints
(passing the same tuple each time is the fast path); never imports asyncio, socket or
ssl, never reads the clock or ``random`` but the injected ``Clock`` and ``Random``.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import struct
from array import array
from collections.abc import Collection, Iterable, Sequence
from typing import Protocol

from meshlet.policy import Balancing, LbAlgorithm
from meshlet.runtime import Clock

DEFAULT_RTT_S = 0.005  # P2CPeakEwma's estimate for an endpoint with no latency sample yet
DECAY_TAU_S = 10.0  # how fast a peak-EWMA estimate forgets (Linkerd's default decay)
POINTS_PER_ENDPOINT = 256  # RingHash: fixed, so that the points never move (see RingHash)
_TRIES = 8  # rejection-sampling tries before falling back to a scan


class Balancer(Protocol):
    def pick(
        self,
        candidates: Sequence[str],
        *,
        exclude: Collection[str] = (),
        hash_key: bytes | None = None,
    ) -> str | None: ...

    def on_start(self, key: str) -> None: ...

    def on_finish(self, key: str, latency_s: float | None, ok: bool) -> None: ...

    def forget(self, keys: Iterable[str]) -> None: ...


def _sample(
    candidates: Sequence[str], exclude: Collection[str], rng: random.Random, avoid: int = -1
) -> int:
    """A uniformly random index of ``candidates`` not excluded and not ``avoid``; -1 if none.

    Rejection sampling (exact and allocation-free while few are excluded), then a scan.
    """
    n = len(candidates)
    for _ in range(_TRIES):
        i = int(rng.random() * n)
        if i != avoid and candidates[i] not in exclude:
            return i
    allowed = [i for i in range(n) if i != avoid and candidates[i] not in exclude]
    return rng.choice(allowed) if allowed else -1


class _TwoChoices:
    """Power of two choices: two distinct random candidates, the cheaper one wins
    (the first drawn on a tie, itself a random choice)."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def _cheaper(self, a: str, b: str) -> str:
        raise NotImplementedError

    def pick(
        self,
        candidates: Sequence[str],
        *,
        exclude: Collection[str] = (),
        hash_key: bytes | None = None,
    ) -> str | None:
        if len(candidates) < 2:
            return candidates[0] if candidates and candidates[0] not in exclude else None
        i = _sample(candidates, exclude, self._rng)
        if i < 0:
            return None
        j = _sample(candidates, exclude, self._rng, avoid=i)
        return candidates[i] if j < 0 else self._cheaper(candidates[i], candidates[j])


class _NoFeedback:
    """For balancers that do not learn from outstanding work or latency."""

    __slots__ = ()

    def on_start(self, key: str) -> None:
        pass

    def on_finish(self, key: str, latency_s: float | None, ok: bool) -> None:
        pass

    def forget(self, keys: Iterable[str]) -> None:
        pass


class RoundRobin(_NoFeedback):
    """Each candidate in turn, resuming after the last endpoint picked.

    Following the last key (not a bare counter) keeps the rotation fair when the
    candidate set changes between picks: an endpoint that is ejected and returns, one
    that leaves or joins, a different order. The first pick starts at a random place so
    that sidecars started together do not all open on the same endpoint.
    """

    __slots__ = ("_index", "_last", "_last_key", "_rng")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._last: Sequence[str] | None = None  # the candidates of the previous pick
        self._last_key: str | None = None
        self._index = -1  # position of _last_key in _last

    def pick(
        self,
        candidates: Sequence[str],
        *,
        exclude: Collection[str] = (),
        hash_key: bytes | None = None,
    ) -> str | None:
        n = len(candidates)
        if n == 0:
            return None
        if self._last_key is None:
            start = int(self._rng.random() * n)
        elif (
            candidates is self._last
            and self._index < n
            and candidates[self._index] == self._last_key
        ):
            start = self._index + 1
        else:
            try:
                start = candidates.index(self._last_key) + 1
            except ValueError:  # it left: whoever took its place is next
                start = self._index
        for step in range(n):
            i = (start + step) % n
            key = candidates[i]
            if key not in exclude:
                self._last, self._last_key, self._index = candidates, key, i
                return key
        return None


class LeastRequest(_TwoChoices):
    """Fewest outstanding requests (L7) or connections (L4), by power of two choices.

    Envoy's default ``choice_count=2`` rather than a scan for the minimum: O(1) per pick
    at any size, an endpoint busier than all others is still never picked, and it does
    not herd: sidecars that each see only their own outstanding counts do not all pile
    onto the one endpoint that looks idle to each of them (two random choices are within
    a log log N factor of the best, Mitzenmacher).
    """

    __slots__ = ("_outstanding",)

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._outstanding: dict[str, int] = {}

    def _cheaper(self, a: str, b: str) -> str:
        load = self._outstanding
        return b if load.get(b, 0) < load.get(a, 0) else a

    def outstanding(self, key: str) -> int:
        return self._outstanding.get(key, 0)

    def on_start(self, key: str) -> None:
        self._outstanding[key] = self._outstanding.get(key, 0) + 1

    def on_finish(self, key: str, latency_s: float | None, ok: bool) -> None:
        n = self._outstanding.get(key, 0)
        if n > 1:
            self._outstanding[key] = n - 1
        else:
            self._outstanding.pop(key, None)  # also: finished after a forget — ignore

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._outstanding.pop(key, None)


class _Ewma:
    __slots__ = ("at", "peak", "pending", "sampled")

    def __init__(self, now: float, default_rtt_s: float) -> None:
        self.peak = default_rtt_s
        self.at = now
        self.pending = 0
        self.sampled = False


class P2CPeakEwma(_TwoChoices):
    """Power of two choices over peak-EWMA latency * (outstanding + 1) (Linkerd, Finagle).

    The latency estimate jumps at once to a sample above it, else decays with time
    constant ``tau_s``: it is the decayed maximum ``max(sample_i * exp(-(now - t_i) /
    tau_s))``. So an endpoint that was slow and gets no traffic forgets it after
    ``tau_s * ln(slow/fast)`` (23 s for 10x) and is tried again. (Finagle blends lower
    samples in and decays on every read; under steady traffic that converges to the
    same, and this does not depend on how often the balancer is read.)

    An endpoint with no sample yet starts at ``default_rtt_s`` (5 ms) as if that had
    been sampled when it was first seen, and that prior decays like a sample; its first
    real sample replaces it. 5 ms is below a typical request through two sidecars and
    an app, so a new endpoint is tried at once when the others are slower or busy. It
    is not flooded before its first answer: two random choices hand it at most about
    2/N of the picks even while it looks best, and its (outstanding + 1) factor stops
    it sooner when the others are idle. Where the others are faster than 5 ms it is
    tried when they queue, or once the prior has decayed below their estimate
    (tau * ln(5 ms / their latency)).

    A failure counts as a sample of at least twice the current estimate (and at least
    the default), so an endpoint that fails fast does not look like the fastest one.
    """

    __slots__ = ("_clock", "_default", "_state", "_tau")

    def __init__(
        self,
        clock: Clock,
        rng: random.Random,
        *,
        default_rtt_s: float = DEFAULT_RTT_S,
        tau_s: float = DECAY_TAU_S,
    ) -> None:
        if default_rtt_s <= 0 or tau_s <= 0:
            raise ValueError("P2CPeakEwma needs default_rtt_s > 0 and tau_s > 0")
        super().__init__(rng)
        self._clock = clock
        self._default = default_rtt_s
        self._tau = tau_s
        self._state: dict[str, _Ewma] = {}

    def _get(self, key: str, now: float) -> _Ewma:
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = _Ewma(now, self._default)
        return st

    def _estimate(self, st: _Ewma, now: float) -> float:
        return st.peak * math.exp((st.at - now) / self._tau)

    def estimate(self, key: str) -> float:
        """The current latency estimate of ``key`` in seconds (for the admin view)."""
        st = self._state.get(key)
        return self._default if st is None else self._estimate(st, self._clock.monotonic())

    def outstanding(self, key: str) -> int:
        st = self._state.get(key)
        return 0 if st is None else st.pending

    def _cheaper(self, a: str, b: str) -> str:
        now = self._clock.monotonic()
        sa, sb = self._get(a, now), self._get(b, now)
        cost_a = self._estimate(sa, now) * (sa.pending + 1)
        cost_b = self._estimate(sb, now) * (sb.pending + 1)
        return b if cost_b < cost_a else a

    def on_start(self, key: str) -> None:
        self._get(key, self._clock.monotonic()).pending += 1

    def on_finish(self, key: str, latency_s: float | None, ok: bool) -> None:
        st = self._state.get(key)
        if st is None:
            return  # forgotten while in flight
        if st.pending > 0:
            st.pending -= 1
        now = self._clock.monotonic()
        current = self._estimate(st, now)
        if ok:
            if latency_s is None:
                return
            sample = latency_s
        else:
            sample = max(latency_s or 0.0, 2.0 * current, self._default)
        st.peak = max(sample, current) if st.sampled else sample
        st.at = now
        st.sampled = True

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._state.pop(key, None)


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


_FOUR_POINTS = struct.Struct(">4Q")


class RingHash(_NoFeedback):
    """Consistent hashing (ketama): the same ``hash_key`` goes to the same endpoint.

    Every endpoint owns ``points_per_endpoint`` pseudo-random points on a 64-bit ring
    (blake2b of ``key#i``, four points per digest); a request goes to the owner of the
    first point at or after the hash of its ``hash_key``. The points of an endpoint
    depend on its key alone (never on how many endpoints there are), so adding or
    removing one of N endpoints moves only the keys on its arcs, about 1/N of them.
    256 points each keep every endpoint's share within a few percent of even for a
    handful of endpoints. The ring (an ``array`` of points and a list of owners) is
    rebuilt only when the candidate set changes, re-hashing only endpoints it has not
    seen. With ``exclude`` the walk goes on to the next point of an allowed endpoint.
    Without a ``hash_key`` (the header is missing) the pick is uniformly random.
    """

    __slots__ = ("_cands", "_keyset", "_owners", "_per", "_points", "_points_of", "_rng")

    def __init__(
        self, rng: random.Random, *, points_per_endpoint: int = POINTS_PER_ENDPOINT
    ) -> None:
        if points_per_endpoint < 4 or points_per_endpoint % 4:
            raise ValueError("RingHash needs points_per_endpoint to be a multiple of 4")
        self._rng = rng
        self._per = points_per_endpoint
        self._cands: Sequence[str] | None = None
        self._keyset: frozenset[str] = frozenset()
        self._points: array[int] = array("Q")
        self._owners: list[str] = []
        self._points_of: dict[str, tuple[int, ...]] = {}

    def _ensure_ring(self, candidates: Sequence[str]) -> None:
        if candidates is self._cands:
            return
        if isinstance(candidates, tuple) and candidates == self._cands:
            self._cands = candidates
            return
        keyset = frozenset(candidates)
        self._cands = candidates if isinstance(candidates, tuple) else tuple(candidates)
        if keyset == self._keyset:
            return
        ring: list[tuple[int, str]] = []
        for key in keyset:
            pts = self._points_of.get(key)
            if pts is None:
                pts = self._points_of[key] = self._make_points(key, self._per)
            ring.extend((p, key) for p in pts)
        ring.sort()
        self._points = array("Q", [p for p, _ in ring])
        self._owners = [k for _, k in ring]
        self._keyset = keyset

    @staticmethod
    def _make_points(key: str, per: int) -> tuple[int, ...]:
        out: list[int] = []
        raw = key.encode()
        for i in range(per // 4):
            digest = hashlib.blake2b(b"%s#%d" % (raw, i), digest_size=32).digest()
            out.extend(_FOUR_POINTS.unpack(digest))
        return tuple(out)

    def pick(
        self,
        candidates: Sequence[str],
        *,
        exclude: Collection[str] = (),
        hash_key: bytes | None = None,
    ) -> str | None:
        if not candidates:
            return None
        if hash_key is None:
            i = _sample(candidates, exclude, self._rng)
            return candidates[i] if i >= 0 else None
        self._ensure_ring(candidates)
        points, owners = self._points, self._owners
        n = len(points)
        i = bisect.bisect_left(points, _hash64(hash_key))
        if not exclude:
            return owners[i % n]
        for step in range(n):
            owner = owners[(i + step) % n]
            if owner not in exclude:
                return owner
        return None

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._points_of.pop(key, None)


def make_balancer(policy: Balancing, clock: Clock, rng: random.Random) -> Balancer:
    """The balancer a service's policy asks for."""
    match policy.algorithm:
        case LbAlgorithm.ROUND_ROBIN:
            return RoundRobin(rng)
        case LbAlgorithm.LEAST_REQUEST:
            return LeastRequest(rng)
        case LbAlgorithm.RING_HASH:
            return RingHash(rng)
        case LbAlgorithm.P2C_EWMA:
            return P2CPeakEwma(clock, rng)
    raise ValueError(f"unknown balancing algorithm {policy.algorithm!r}")
