"""The blocking client."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from normserve.client import _common as c
from normserve.client._errors import from_rpc_error
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
        self, method: Callable[..., T], request: Any, timeout: Any, metadata: Any = None
    ) -> T:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is _DEFAULT else timeout,
                metadata=self._metadata(metadata),
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.target) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- sessions

    def create_session(
        self,
        num_features: int,
        *,
        session_id: str = "",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        weight: ArrayLike | None = None,
        bias: ArrayLike | None = None,
        device: str = "",
        allow_non_finite: bool = False,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> c.SessionInfo:
        """Creates a batch-norm session, like ``torch.nn.BatchNorm*d(num_features, eps, momentum,
        affine, track_running_stats)``; ``momentum=None`` is the cumulative average. ``session_id``:
        your id (default: the server picks one); ``weight``/``bias``: initial affine parameters;
        ``device``: "auto", "cpu", "cuda" or "cuda:N"; ``allow_non_finite``: accept NaN/Inf."""
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
        )
        return c.session_info(self._call(self._stub.CreateSession, req, timeout, metadata).session)

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

    # ---- normalization

    def normalize(
        self,
        session_id: str,
        x: ArrayLike,
        *,
        mode: c.ModeName = "train",
        statistics_only: bool = False,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> c.NormalizeResult:
        """Normalizes one batch (streamed in chunks if it is larger than ``chunk_bytes``)."""
        from normserve.client import _tensors as tx  # torch: loaded on first use

        t = tx.as_batch(x)
        if not tx.fits_unary(t, self.chunk_bytes):
            return next(
                self.normalize_stream(
                    session_id,
                    [x],
                    mode=mode,
                    statistics_only=statistics_only,
                    timeout=timeout,
                    metadata=metadata,
                )
            )
        req = tx.normalize_request(session_id, t, mode, statistics_only)
        return tx.normalize_result(
            self._call(self._normalize, req, timeout, metadata), tx._Like.of(x)
        )

    def normalize_stream(
        self,
        session_id: str,
        batches: Iterable[ArrayLike],
        *,
        mode: c.ModeName = "train",
        statistics_only: bool = False,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> Iterator[c.NormalizeResult]:
        """Normalizes many batches on one stream; yields their results in order."""
        from normserve.client import _tensors as tx  # torch: loaded on first use

        plan = tx.StreamPlan(session_id, mode, statistics_only, self.chunk_bytes)
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
