"""What the outcome of an outbound HTTP/2 try leads to: a retry on another endpoint, the
response committed downstream, or the sidecar's own answer; and the gRPC deadline after
the response head.

For: ``RetryingCall``, the half of ``sidecar.h2_outbound_call.OutboundCall`` that judges
(the other half routes, admits and places tries). Retries follow
``sidecar.l7policy.RetryState`` (connect failure, a reset before the response head with
REFUSED_STREAM always safe, 502/503/504, a trailers-only gRPC status in ``on_grpc``, a
per-try timeout), only while every request byte so far is held, after the backoff.
Answers carry ``x-meshlet-attempts``; an overflow also ``x-meshlet-overflow``. Each try
is reported once to the balancer and the outlier detector; the REQUESTS unit of the
breaker is given back when the request is over.

Must never: retry once a response head went downstream, or report a try twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from meshlet.model import Service
from sidecar.accesslog import ResponseFlag
from sidecar.breaker import Breaker, Kind
from sidecar.clusters import Cluster
from sidecar.h2_call import Call, Try
from sidecar.h2_headers import (
    GRPC_DEADLINE_EXCEEDED,
    GRPC_UNAVAILABLE,
    Headers,
    grpc_status_of,
    grpc_trailers,
    status_of,
)
from sidecar.l7_outbound import OVERFLOW_HEADER
from sidecar.l7policy import (
    ATTEMPTS_HEADER,
    Deadline,
    GrpcStatus,
    Outcome,
    ResetBeforeResponse,
    RetryDecision,
    RetryState,
    Status,
    Timeout,
)

if TYPE_CHECKING:
    from sidecar.h2_outbound import H2Outbound

log = logging.getLogger(__name__)


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class RetryingCall(Call):
    """See the module docstring; ``OutboundCall`` sets the attributes and ``_next_try``."""

    __slots__ = ("breaker", "call_deadline", "cluster", "deadline", "owner", "service", "state")
    owner: H2Outbound
    breaker: Breaker | None
    deadline: Deadline  # until the response head: the route's timeout, the caller's
    call_deadline: Deadline  # the whole call: the caller's grpc-timeout
    service: Service
    cluster: Cluster
    state: RetryState

    def _next_try(self) -> None:
        raise NotImplementedError

    def on_response_head(self, t: Try, headers: Headers) -> None:
        up = t.up
        assert up is not None
        latency = self.loop.time() - t.started
        status = status_of(headers)
        gs = grpc_status_of(headers) if self.grpc and up.remote_ended else None
        self._report(t, latency, status < 500 and gs != GRPC_UNAVAILABLE)
        self.rec.upstream_ms = int(latency * 1000)
        outcome: Outcome | None = None
        if status in self.service.policy.retries.on_statuses:
            outcome = Status(status)
        elif gs:  # a trailers-only gRPC error
            outcome = GrpcStatus.from_code(gs)
        if outcome is not None and self.body is not None:
            decision = self.state.may_retry(outcome)
            if decision.retry:
                self.try_ = None
                self.cancel_timer()
                up.reset(ErrorCodes.CANCEL)
                self._retry(decision)
                return
            self._not_retried(decision)
        self.rec.attempts = self.state.attempts
        self.commit(t, headers, ((ATTEMPTS_HEADER, b"%d" % self.state.attempts),))
        left = self.call_deadline.remaining(self.owner.rt.clock)
        if left is not None and not self.finished:
            self.timer = self.loop.call_later(left, self._call_expired)

    def on_try_failed(self, t: Try, code: int, reason: str) -> None:
        self._report(t, None, False)
        if reason == "headers":  # its response head was over our limits
            msg, flag = (
                "upstream response head over the limits",
                ResponseFlag.UPSTREAM_PROTOCOL_ERROR,
            )
            self._failed(ResetBeforeResponse(), 502, flag, msg)
            return
        refused = reason == "refused" or code == ErrorCodes.REFUSED_STREAM
        name = _code_name(code)
        self._failed(
            ResetBeforeResponse(refused_stream=refused), 503,
            ResponseFlag.UPSTREAM_CONNECTION_TERMINATION,
            f"upstream reset before response ({reason}, {name})",
        )  # fmt: skip

    def _failed(self, outcome: Outcome, status: int, flag: ResponseFlag, msg: str) -> None:
        if self.finished:
            return
        if self.body is not None:  # every request byte so far is held: it may go again
            decision = self.state.may_retry(outcome)
            if decision.retry:
                self._retry(decision)
                return
            self._not_retried(decision)
        if isinstance(outcome, Timeout):
            self.owner.metrics.timeouts.labels("outbound", self.rec.service, self.rec.route).inc()
        self._answer(status, msg, flag)

    def _retry(self, decision: RetryDecision) -> None:
        self.owner.metrics.retries.labels(self.rec.service, self.rec.route).inc()
        self.timer = self.loop.call_later(decision.backoff_s, self._next_try)

    def _not_retried(self, decision: RetryDecision) -> None:
        if decision.limit_reached:
            self.rec.flags.append(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
            self.owner.metrics.retries_skipped.labels(self.rec.service, decision.reason.value).inc()

    def _call_expired(self) -> None:
        """The gRPC deadline passed after the response head: DEADLINE_EXCEEDED trailers."""
        self.timer = None
        if self.finished:
            return
        t, self.try_ = self.try_, None
        rec = self.rec
        rec.flags.append(ResponseFlag.UPSTREAM_REQUEST_TIMEOUT)
        self.owner.metrics.timeouts.labels("outbound", rec.service, rec.route).inc()
        down = self.down
        if not (down.end_pending or down.local_ended):
            down.send_trailers(grpc_trailers(GRPC_DEADLINE_EXCEEDED, "deadline exceeded"))
        self.grpc_status = GRPC_DEADLINE_EXCEEDED
        self.resp_ended = True
        self.discard()
        if t is not None and t.up is not None:
            t.up.reset(ErrorCodes.CANCEL)
        self._finish()

    def _overflow(self, kind: Kind) -> None:
        self.owner.metrics.overflows.labels(self.rec.service, kind.value).inc()
        msg = f"circuit breaker open: too many {kind.value} to {self.rec.service}"
        fields = ((OVERFLOW_HEADER, kind.value.encode()),)
        self._answer(503, msg, ResponseFlag.UPSTREAM_OVERFLOW, fields)

    def _answer(
        self,
        status: int,
        msg: str,
        flag: ResponseFlag,
        fields: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        if self.rec.attempts:
            fields = (*fields, (ATTEMPTS_HEADER, b"%d" % self.rec.attempts))
        self.reply(status, msg, flag, fields)

    def _report(self, t: Try, latency_s: float | None, ok: bool) -> None:
        """The try's answer to the balancer and the outlier detector, once."""
        if t.reported or t.endpoint is None:
            return
        t.reported = True
        o = self.owner
        if o.clusters.answered(self.cluster, t.endpoint, latency_s, ok):
            o.metrics.ejections.labels(self.rec.service).inc()
            log.warning(
                "endpoint ejected", extra={"service": self.rec.service, "endpoint": t.endpoint.id}
            )

    def on_abandoned(self, t: Try) -> None:
        if not t.reported and t.endpoint is not None:
            t.reported = True
            self.cluster.balancer.on_finish(t.endpoint.id, None, True)

    def on_finished(self) -> None:
        if self.breaker is not None:
            self.breaker.release(Kind.REQUESTS)
            self.breaker = None
