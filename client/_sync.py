"""The blocking client."""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from normserve.client import _common as c
from normserve.client._errors import NormserveError, from_rpc_error
from normserve.v1 import normserve_pb2 as pb

if TYPE_CHECKING:
    import torch

    from normserve.client._tensors import ArrayLike

__all__ = ["Client"]

T = TypeVar("T")

_DEFAULT: Any = object()


class Client(c.ClientBase):
    """A connection to a normserve server.

    Every method takes a per-call ``timeout`` in seconds (default: the client's). Failures raise
    ``NormserveError`` subclasses carrying the gRPC status code and the server's message. Batches
    larger than ``chunk_bytes`` are streamed in chunks transparently.

    A secured server: ``Client(target, ca_file="ca.pem", token=token)`` (TLS trusting that CA,
    a bearer token with every call); ``cert_file``/``key_file`` add a client certificate (mutual
    TLS), ``tls=True`` trusts the system's root certificates.

    >>> with Client("127.0.0.1:50051") as client:
    ...     s = client.create_session(64)
    ...     y = client.normalize(s.session_id, torch.randn(32, 64, 8, 8)).output
    """

    def _open(self, target: str, credentials: grpc.ChannelCredentials | None, options: Any) -> Any:
        if credentials is not None:
            return grpc.secure_channel(target, credentials, options)
        return grpc.insecure_channel(target, options)

    # ---- plumbing

    def _call(
        self,
        method: Callable[..., T],
        request: Any,
        timeout: Any,
        metadata: Any = None,
        after_retry: Callable[[grpc.StatusCode], T | None] | None = None,
    ) -> T:
        """One call, tried again under the client's retry policy. ``after_retry``: what a
        failure means when an earlier try may have been applied (an ALREADY_EXISTS of a
        create): its result, or None to raise it."""
        retrier = self.retry.start(self.timeout if timeout is _DEFAULT else timeout)
        md = self._metadata(metadata)
        refusal: grpc.RpcError | None = None  # says more than the deadline that ends the retries
        while True:
            try:
                return method(request, timeout=retrier.timeout(), metadata=md)
            except grpc.RpcError as err:
                code = err.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
                    refusal = err  # e.g. a synchronized step a participant never reached
                elif code == grpc.StatusCode.DEADLINE_EXCEEDED and refusal is not None:
                    err = refusal
                if after_retry is not None and retrier.failed:
                    answer = after_retry(code)
                    if answer is not None:
                        return answer
                delay = retrier.delay(code)
                if delay is None:
                    raise from_rpc_error(err, self.target) from None
            time.sleep(delay)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- sessions

    def create_session(
        self,
        num_features: int = 0,
        *,
        session_id: str = "",
        eps: float | None = None,
        momentum: float | None = 0.1,
        affine: bool | None = None,
        track_running_stats: bool | None = None,
        weight: ArrayLike | None = None,
        bias: ArrayLike | None = None,
        device: str = "",
        allow_non_finite: bool = False,
        ttl_seconds: float | None = None,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
        kind: c.KindName = "batch_norm",
        normalized_shape: int | Sequence[int] | None = None,
        num_groups: int = 0,
        has_bias: bool | None = None,
        sync_participants: int = 0,
        sync_timeout: float | None = None,
        renorm: c.RenormLimits | None = None,
        ghost_batch_size: int = 0,
        time_steps: int = 0,
    ) -> c.SessionInfo:
        """Creates a session of ``kind``, like its torch module: ``"batch_norm"``
        (``torch.nn.BatchNorm*d(num_features, eps, momentum, affine, track_running_stats)``),
        ``"layer_norm"`` (``LayerNorm(normalized_shape, eps, elementwise_affine=affine,
        bias=has_bias)``), ``"group_norm"`` (``GroupNorm(num_groups, num_features, eps, affine)``),
        ``"instance_norm"`` (``InstanceNorm*d(num_features, eps, momentum, affine,
        track_running_stats)``), ``"rms_norm"`` (``RMSNorm(normalized_shape, eps,
        elementwise_affine=affine)``), ``"batch_renorm"`` (batch norm with ``renorm``'s limits;
        None: rmax 3, dmax 5, no warm-up), ``"ghost_batch_norm"`` (batch norm over virtual
        batches of ``ghost_batch_size``) or ``"recurrent_batch_norm"`` (batch norm with
        ``time_steps`` slots of running statistics, ``normalize(..., time_step=t)``); for layer and RMS norm ``num_features`` may be 0 (the
        product of ``normalized_shape``). ``eps``, ``affine``, ``track_running_stats`` and
        ``has_bias`` left None take torch's default for the kind; ``momentum=None`` is torch's
        momentum=None (the cumulative average for batch norm), and is sent only to the kinds that
        keep running statistics unless changed from its default. ``session_id``: your id (default:
        the server picks one); ``weight``/``bias``: initial affine parameters; ``device``: "auto",
        "cpu", "cuda" or "cuda:N"; ``allow_non_finite``: accept NaN/Inf; ``ttl_seconds``: idle
        seconds before it expires (0: never; None: the server's default); ``sync_participants``:
        a synchronized batch norm session of that many participants (``sync_timeout``: seconds
        a step waits for its last one; None: the server's 30)."""
        req = c.create_request(
            num_features,
            session_id=session_id,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            weight=weight,
            bias=bias,
            device=device,
            allow_non_finite=allow_non_finite,
            ttl_seconds=ttl_seconds,
            kind=kind,
            normalized_shape=normalized_shape,
            num_groups=num_groups,
            has_bias=has_bias,
            sync_participants=sync_participants,
            sync_timeout=sync_timeout,
            renorm=renorm,
            ghost_batch_size=ghost_batch_size,
            time_steps=time_steps,
        )

        def already_created(code: grpc.StatusCode) -> Any:
            # an earlier try created it, and its answer was lost: the session is there
            if code == grpc.StatusCode.ALREADY_EXISTS and session_id:
                return pb.CreateSessionResponse(
                    session=self._stub.GetSession(
                        pb.GetSessionRequest(session_id=session_id),
                        timeout=self.timeout if timeout is _DEFAULT else timeout,
                        metadata=self._metadata(metadata),
                    ).session
                )
            return None

        resp = self._call(self._stub.CreateSession, req, timeout, metadata, already_created)
        return c.session_info(resp.session)

    def get_session(
        self,
        session_id: str,
        *,
        tensors: bool = True,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> c.SessionInfo:
        req = pb.GetSessionRequest(session_id=session_id, omit_tensors=not tensors)
        return c.session_info(self._call(self._stub.GetSession, req, timeout, metadata).session)

    def list_sessions(
        self, *, page_size: int = 0, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> list[c.SessionInfo]:
        """Every session (all pages), without tensors."""
        out: list[c.SessionInfo] = []
        token = ""
        while True:
            req = pb.ListSessionsRequest(page_size=page_size, page_token=token)
            resp = self._call(self._stub.ListSessions, req, timeout, metadata)
            out += [c.session_info(s) for s in resp.sessions]
            token = resp.next_page_token
            if not token:
                return out

    def delete_session(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> None:
        self._call(
            self._stub.DeleteSession,
            pb.DeleteSessionRequest(session_id=session_id),
            timeout,
            metadata,
            # an earlier try deleted it, and its answer was lost
            lambda code: pb.DeleteSessionResponse() if code == grpc.StatusCode.NOT_FOUND else None,
        )

    def reset_session(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> c.SessionInfo:
        req = pb.ResetSessionRequest(session_id=session_id)
        return c.session_info(self._call(self._stub.ResetSession, req, timeout, metadata).session)

    def export_state(
        self,
        session_id: str,
        *,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> OrderedDict[str, torch.Tensor]:
        """The session's state_dict, loadable by ``torch.nn.BatchNorm*d.load_state_dict``."""
        from normserve.client import _tensors as tx  # torch: loaded on first use

        req = pb.ExportStateRequest(session_id=session_id)
        return tx.state_dict(self._call(self._stub.ExportState, req, timeout, metadata))

    def import_state(
        self,
        session_id: str,
        state: Mapping[str, ArrayLike],
        *,
        strict: bool = True,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> c.SessionInfo:
        from normserve.client import _tensors as tx  # torch: loaded on first use

        req = tx.import_request(session_id, state, strict)
        return c.session_info(self._call(self._stub.ImportState, req, timeout, metadata).session)

    # ---- freezing, recalibration, adaptation (see docs/calibration.md)

    def _change(
        self, change: str, session_id: str, timeout: Any, metadata: c.Metadata
    ) -> c.SessionInfo:
        rpc, request = c.CHANGES[change]
        req = request(session_id=session_id)
        return c.session_info(
            (self._call(getattr(self._stub, rpc), req, timeout, metadata)).session
        )

    def freeze(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> c.SessionInfo:
        """Freezes the session: the server refuses every change of state until ``unfreeze``."""
        return self._change("freeze", session_id, timeout, metadata)

    def unfreeze(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> c.SessionInfo:
        return self._change("unfreeze", session_id, timeout, metadata)

    def start_calibration(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> c.SessionInfo:
        """Begins a recalibration: ``normalize(..., mode="calibrate")`` batches then accumulate
        exact population statistics, which ``commit_calibration`` installs."""
        return self._change("start_calibration", session_id, timeout, metadata)

    def commit_calibration(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> c.SessionInfo:
        return self._change("commit_calibration", session_id, timeout, metadata)

    def abort_calibration(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> c.SessionInfo:
        return self._change("abort_calibration", session_id, timeout, metadata)

    def reset_adaptation(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> c.SessionInfo:
        """Discards the session's adapted statistics."""
        return self._change("reset_adaptation", session_id, timeout, metadata)

    def promote_adaptation(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> c.SessionInfo:
        """Replaces the running statistics with the adapted ones (and discards those)."""
        return self._change("promote_adaptation", session_id, timeout, metadata)

    @contextlib.contextmanager
    def calibration(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> Iterator[c.SessionInfo]:
        """``with client.calibration(sid):`` starts a recalibration, commits it when the block
        ends, aborts it when the block raises (and re-raises) or the commit is refused (e.g. no
        batch was accumulated): the session never stays calibrating."""
        info = self.start_calibration(session_id, timeout=timeout, metadata=metadata)
        try:
            yield info
        except BaseException as err:
            try:
                self.abort_calibration(session_id, timeout=timeout, metadata=metadata)
            except Exception as abort_err:  # the block's own error is the one to see
                err.add_note(f"(and aborting the calibration failed: {abort_err})")
            raise
        try:
            self.commit_calibration(session_id, timeout=timeout, metadata=metadata)
        except BaseException as err:
            # a refused commit (nothing accumulated, ...) must not leave the session calibrating
            try:
                self.abort_calibration(session_id, timeout=timeout, metadata=metadata)
            except Exception as abort_err:
                err.add_note(f"(and aborting the calibration failed: {abort_err})")
            else:
                err.add_note("the calibration was aborted: the running statistics are unchanged")
            raise

    # ---- normalization

    def normalize(
        self,
        session_id: str,
        x: ArrayLike,
        *,
        mode: c.ModeName | None = None,
        statistics_only: bool = False,
        idempotency_key: str | None = None,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
        sync: tuple[int, int] | None = None,
        time_step: int = 0,
        adapt: float | None = None,
        adapt_accumulate: bool = False,
    ) -> c.NormalizeResult:
        """Normalizes one batch (streamed in chunks if it is larger than ``chunk_bytes``). A
        TRAIN batch carries ``idempotency_key`` (default: a fresh UUID), the same on every
        retry, so it is applied once. ``sync``: (rank, step) of a TRAIN batch on a synchronized
        session (a batch larger than ``chunk_bytes`` joins its step on a stream). ``time_step``:
        the batch's step in a recurrent batch norm session. ``mode="calibrate"``: a recalibration batch (see
        ``calibration``). ``adapt``: an EVAL batch normalized with ``(1 - adapt)`` of the kept
        statistics and ``adapt`` of its own (mode defaults to "eval"); ``adapt_accumulate`` also
        folds it into the session's adapted statistics. Like TRAIN batches, these are streamed
        in chunks when larger than ``chunk_bytes``."""
        from normserve.client import _tensors as tx  # torch: loaded on first use

        t = tx.as_batch(x)
        adaptation = c.adaptation(adapt, adapt_accumulate)
        mode = c.resolve_mode(mode, adapt)
        key = c.normalize_key(mode, adapt, adapt_accumulate, idempotency_key)
        if not tx.fits_unary(t, self.chunk_bytes):
            # one batch on a stream of its own, tried again as a unary call would be
            retrier = self.retry.start(self.timeout if timeout is _DEFAULT else timeout)
            while True:
                try:
                    return next(
                        self.normalize_stream(
                            session_id,
                            [x],
                            mode=mode,
                            statistics_only=statistics_only,
                            timeout=retrier.timeout(),
                            metadata=metadata,
                            idempotency_keys=iter([key]),
                            time_step=time_step,
                            sync=sync,
                            adapt=adapt,
                            adapt_accumulate=adapt_accumulate,
                        )
                    )
                except NormserveError as err:
                    delay = retrier.delay(err.code)
                    if delay is None:
                        raise
                time.sleep(delay)
        req = tx.normalize_request(
            session_id, t, mode, statistics_only, key, sync, time_step, adaptation
        )
        return tx.normalize_result(
            self._call(self._normalize, req, timeout, metadata), tx._Like.of(x)
        )

    def sync_reduce(
        self,
        session_id: str,
        sync: tuple[int, int],
        sum_dy: ArrayLike,
        sum_dy_xhat: ArrayLike,
        count: int,
        *,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> c.SyncReduced:
        """A synchronized step's backward reductions: this participant's per-channel sums of dy
        and dy * x_hat over its ``count`` values per channel; returns the group's."""
        req = c.sync_reduce_request(session_id, sync, sum_dy, sum_dy_xhat, count)
        return c.sync_reduced(self._call(self._stub.SyncReduce, req, timeout, metadata))

    def normalize_stream(
        self,
        session_id: str,
        batches: Iterable[ArrayLike],
        *,
        mode: c.ModeName | None = None,
        statistics_only: bool = False,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
        idempotency_keys: Iterator[str] | None = None,
        time_step: int = 0,
        sync: tuple[int, int] | None = None,
        adapt: float | None = None,
        adapt_accumulate: bool = False,
    ) -> Iterator[c.NormalizeResult]:
        """Normalizes many batches on one stream; yields their results in order. ``mode``:
        "train" (the default), "eval" (the default with ``adapt``) or "calibrate" (recalibration
        batches, see ``calibration``); ``adapt``: every batch is an adapting EVAL batch (see
        ``normalize``), ``adapt_accumulate`` folding each into the adapted statistics. Each batch
        that changes state (TRAIN, CALIBRATE, accumulating adaptation) carries an idempotency key
        (default: a fresh UUID each; ``idempotency_keys`` gives them, e.g. to resend batches
        after a failure); ``time_step``: every batch's, in a recurrent batch norm session;
        ``sync``: (rank, step) of the first batch on a synchronized session, each later batch the
        next step. The stream is not retried."""
        from normserve.client import _tensors as tx  # torch: loaded on first use

        plan = tx.StreamPlan(
            session_id,
            c.resolve_mode(mode, adapt),
            statistics_only,
            self.chunk_bytes,
            idempotency_keys,
            time_step,
            sync,
            c.adaptation(adapt, adapt_accumulate),
        )
        timeout = self.timeout if timeout is _DEFAULT else timeout
        try:
            for msg in self._normalize_stream(
                plan.requests(batches), timeout=timeout, metadata=self._metadata(metadata)
            ):
                result = plan.feed(msg)
                if result is not None:
                    yield result
        except grpc.RpcError as err:
            if plan.error is not None:
                raise plan.error from None
            raise from_rpc_error(err, self.target) from None
        if plan.error is not None:
            raise plan.error

    # ---- health

    def health(
        self, service: str = "", *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> str:
        """The health service's status: "SERVING", "NOT_SERVING", ..."""
        req = health_pb2.HealthCheckRequest(service=service)
        status = self._call(self._health.Check, req, timeout, metadata).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
