"""Keep this sidecar's endpoint registered with the control plane: register, heartbeat, and
on the way out drain and deregister — over the mTLS channel, as the sidecar's own SVID.

``Registrar.run()`` registers (retrying with full-jitter backoff), then heartbeats every
``interval_s``. A heartbeat answered NOT_FOUND (the control plane forgot or expired the
endpoint) registers again at once. A control plane that is down or refusing is waited out:
run() keeps trying and logs once per change of state (registered / unreachable / refused),
not once per attempt. ``drain()`` and ``deregister()`` are best effort with a short
timeout: shutdown must not hang on a control plane that is gone.

Every call is serialized (one at a time), so a Deregister is never overtaken by a Register
still in flight. Must never: let an error escape run(), register after deregister(), or
re-register a draining endpoint as healthy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from meshlet import discovery_client as dc
from meshlet.model import Endpoint, Health, ServicePort
from meshlet.runtime import Clock
from sidecar import backoff

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 2.0
BACKOFF_BASE_S = 0.2
_UNREACHABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})


@dataclass(slots=True)
class RegistrarCounters:
    registrations: int = 0  # successful Register calls (the first and every re-registration)
    reregistrations: int = 0  # of those, after the control plane answered NOT_FOUND
    heartbeats: int = 0  # successful Heartbeat calls
    failures: int = 0  # calls that failed (unreachable or refused)


class Registrar:
    """Registers ``endpoint`` through ``channel_provider()`` (called for every call, so a
    channel recreated after a certificate renewal is used at once) and keeps it alive."""

    def __init__(
        self,
        channel_provider: Callable[[], grpc.aio.Channel],
        endpoint: Endpoint,
        *,
        service_ports: Sequence[ServicePort] = (),
        interval_s: float = 5.0,
        clock: Clock,
        rng: random.Random,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_max_s: float | None = None,
        call_timeout_s: float | None = None,
        shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self._channel_provider = channel_provider
        self._endpoint = endpoint
        self._ports = tuple(service_ports)
        self._interval = interval_s
        self._clock = clock
        self._rng = rng
        self._backoff_base = backoff_base_s
        self._backoff_max = interval_s if backoff_max_s is None else backoff_max_s
        self._call_timeout = (
            min(dc.CALL_TIMEOUT_S, interval_s) if call_timeout_s is None else call_timeout_s
        )
        self._shutdown_timeout = shutdown_timeout_s
        self._lock = asyncio.Lock()  # one call at a time
        self._wake = asyncio.Event()
        self._deregistered = False
        self._state = ""  # what was last logged: "registered", "unreachable", "refused:CODE"
        self.registered = False  # the control plane holds our endpoint, as far as we know
        self.stored: Endpoint | None = None  # the endpoint as the control plane stored it
        self.health: Health | None = None  # its health after the last successful call
        self.last_success: float | None = None  # clock.monotonic() of the last successful call
        self.counters = RegistrarCounters()

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    # ---- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Register, then heartbeat every ``interval_s``, until cancelled or deregistered."""
        attempt = 0
        while not self._deregistered:
            ok = await self._step()
            if self._deregistered:
                return
            if ok is None:  # NOT_FOUND on a heartbeat: register again at once
                attempt, wait = 0, 0.0
            elif ok:
                attempt, wait = 0, self._interval
            else:
                attempt += 1
                wait = backoff.delay(attempt, self._backoff_base, self._backoff_max, self._rng)
            if wait > 0:
                self._wake.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _step(self) -> bool | None:
        """One Register or Heartbeat: True when it worked, None after NOT_FOUND, else False."""
        async with self._lock:
            if self._deregistered:
                return True
            registering = not self.registered
            try:
                stub = dc.RegistrationStub(self._channel_provider())  # type: ignore[no-untyped-call]
                if registering:
                    self.stored = await dc.register(
                        stub, self._endpoint, self._ports, timeout_s=self._call_timeout
                    )
                    self.health = self.stored.health
                    self.registered = True
                    self.counters.registrations += 1
                else:
                    self.health = await dc.heartbeat(
                        stub, self._endpoint.id, timeout_s=self._call_timeout
                    )
                    self.counters.heartbeats += 1
            except dc.ControlPlaneError as e:
                self.counters.failures += 1
                if e.code == "NOT_FOUND" and not registering:
                    self.registered = False
                    self.counters.reregistrations += 1
                    log.warning(
                        "the control plane no longer knows this endpoint: registering again",
                        extra={"id": self._endpoint.id},
                    )
                    return None
                self._note_failure(e.code, str(e), registering)
                return False
            except Exception as e:  # a broken channel provider, a bad answer: keep going
                self.counters.failures += 1
                self._note_failure(type(e).__name__, str(e), registering)
                return False
            self.last_success = self._clock.monotonic()
            message = "endpoint registered" if registering else "heartbeats reach the control plane"
            self._note("registered", message, logging.INFO)
            return True

    def _note_failure(self, code: str, reason: str, registering: bool) -> None:
        state = "unreachable" if code in _UNREACHABLE else f"refused:{code}"
        what = "registration" if registering else "heartbeat"
        if state == "unreachable":
            message = f"cannot reach the control plane for {what}: retrying ({reason})"
        else:
            message = f"the control plane refused {what}: retrying ({reason})"
        self._note(state, message, logging.WARNING)

    def _note(self, state: str, message: str, level: int) -> None:
        """Log only when the state changes (not once per attempt)."""
        if state == self._state:
            return
        self._state = state
        log.log(level, message, extra={"id": self._endpoint.id, "state": state})

    # ---- shutdown --------------------------------------------------------------------------

    async def drain(self) -> bool:
        """Mark the endpoint draining (no new traffic); whether the control plane took it.

        A later re-registration (run() after NOT_FOUND) registers it as draining too.
        """
        self._endpoint = dataclasses.replace(self._endpoint, health=Health.DRAINING)

        async def call(stub: dc.RegistrationStub) -> None:
            self.health = await dc.set_health(
                stub, self._endpoint.id, Health.DRAINING, timeout_s=self._shutdown_timeout
            )

        return await self._best_effort("drain", call)

    async def deregister(self) -> bool:
        """Remove the endpoint and stop run(); whether the control plane confirmed it."""
        self._deregistered = True
        self._wake.set()

        async def call(stub: dc.RegistrationStub) -> None:
            try:
                await dc.deregister(stub, self._endpoint.id, timeout_s=self._shutdown_timeout)
            except dc.ControlPlaneError as e:
                if e.code != "NOT_FOUND":  # already gone is what we wanted
                    raise
            self.registered = False

        return await self._best_effort("deregister", call)

    async def _best_effort(
        self, what: str, call: Callable[[dc.RegistrationStub], Awaitable[None]]
    ) -> bool:
        """Run ``call`` within the shutdown timeout (waiting for a call in flight included)."""
        extra = {"id": self._endpoint.id}
        try:
            async with asyncio.timeout(self._shutdown_timeout):
                async with self._lock:
                    await call(dc.RegistrationStub(self._channel_provider()))  # type: ignore[no-untyped-call]
        except TimeoutError:
            log.warning("%s: the control plane did not answer in time", what, extra=extra)
            return False
        except Exception as e:  # best effort: the caller is shutting down either way
            log.warning("%s failed: %s", what, e, extra=extra)
            return False
        log.info("%s: done", what, extra=extra)
        return True
