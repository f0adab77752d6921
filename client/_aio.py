"""The asyncio client: the same methods as ``Client``, awaitable."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2

from normserve.client import _common as c
from normserve.client._errors import from_rpc_error
from normserve.v1 import normserve_pb2 as pb

__all__ = ["AsyncClient"]

T = TypeVar("T")

_DEFAULT: Any = object()


class AsyncClient(c.ClientBase):
    """An asyncio connection to a normserve server; see ``Client`` for the semantics.

    Every method takes a per-call ``timeout`` in seconds (default: the client's). Failures raise
    ``NormserveError`` subclasses carrying the gRPC status code and the server's message. Batches
    larger than ``chunk_bytes`` are streamed in chunks transparently.

    >>> async with AsyncClient("127.0.0.1:50051") as client:
    ...     s = await client.create_session(64)
    ...     y = (await client.normalize(s.session_id, torch.randn(32, 64, 8, 8))).output
    """

    def _open(self, target: str, credentials: grpc.ChannelCredentials | None, options: Any) -> Any:
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, options)
        return grpc.aio.insecure_channel(target, options)

    # ---- plumbing

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: Any, metadata: Any = None
    ) -> T:
        try:
            return await method(
                request,
                timeout=self.timeout if timeout is _DEFAULT else timeout,
                metadata=self._metadata(metadata),
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- sessions

    async def create_session(
        self,
        num_features: int,
        *,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
        **config: Any,
    ) -> c.SessionInfo:
        """Creates a session. ``config``: session_id, eps, momentum (None: cumulative average),
        affine, track_running_stats, weight, bias, device, allow_non_finite."""
        req = c.create_request(num_features, **config)
        return c.session_info(
            (await self._call(self._stub.CreateSession, req, timeout, metadata)).session
        )

    async def get_session(
        self,
        session_id: str,
        *,
        tensors: bool = True,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> c.SessionInfo:
        req = pb.GetSessionRequest(session_id=session_id, omit_tensors=not tensors)
        return c.session_info(
            (await self._call(self._stub.GetSession, req, timeout, metadata)).session
        )

    async def list_sessions(
        self,
        *,
        page_size: int = 0,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> list[c.SessionInfo]:
        """Every session (all pages), without tensors."""
        out: list[c.SessionInfo] = []
        token = ""
        while True:
            req = pb.ListSessionsRequest(page_size=page_size, page_token=token)
            resp = await self._call(self._stub.ListSessions, req, timeout, metadata)
            out += [c.session_info(s) for s in resp.sessions]
            token = resp.next_page_token
            if not token:
                return out

    async def delete_session(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> None:
        await self._call(
            self._stub.DeleteSession,
            pb.DeleteSessionRequest(session_id=session_id),
            timeout,
            metadata,
        )

    async def reset_session(
        self, session_id: str, *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> c.SessionInfo:
        req = pb.ResetSessionRequest(session_id=session_id)
        return c.session_info(
            (await self._call(self._stub.ResetSession, req, timeout, metadata)).session
        )

    async def export_state(
        self,
        session_id: str,
        *,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> OrderedDict[str, torch.Tensor]:
        """The session's state_dict, loadable by ``torch.nn.BatchNorm*d.load_state_dict``."""
        req = pb.ExportStateRequest(session_id=session_id)
        return c.state_dict(await self._call(self._stub.ExportState, req, timeout, metadata))

    async def import_state(
        self,
        session_id: str,
        state: Mapping[str, c.ArrayLike],
        *,
        strict: bool = True,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> c.SessionInfo:
        req = c.import_request(session_id, state, strict)
        return c.session_info(
            (await self._call(self._stub.ImportState, req, timeout, metadata)).session
        )

    # ---- normalization

    async def normalize(
        self,
        session_id: str,
        x: c.ArrayLike,
        *,
        mode: c.ModeName = "train",
        statistics_only: bool = False,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> c.NormalizeResult:
        """Normalizes one batch (streamed in chunks if it is larger than ``chunk_bytes``)."""
        t = c.as_tensor(x)
        if not c.fits_unary(t, self.chunk_bytes):
            async for result in self.normalize_stream(
                session_id,
                [x],
                mode=mode,
                statistics_only=statistics_only,
                timeout=timeout,
                metadata=metadata,
            ):
                return result
            raise AssertionError("the stream ended without an answer")
        req = c.normalize_request(session_id, t, mode, statistics_only)
        return c.normalize_result(
            await self._call(self._normalize, req, timeout, metadata), c._Like.of(x)
        )

    async def normalize_stream(
        self,
        session_id: str,
        batches: Iterable[c.ArrayLike],
        *,
        mode: c.ModeName = "train",
        statistics_only: bool = False,
        timeout: Any = _DEFAULT,
        metadata: c.Metadata = None,
    ) -> AsyncIterator[c.NormalizeResult]:
        """Normalizes many batches on one stream; yields their results in order."""
        plan = c.StreamPlan(session_id, mode, statistics_only, self.chunk_bytes)
        timeout = self.timeout if timeout is _DEFAULT else timeout
        try:
            call = self._normalize_stream(
                plan.requests(batches), timeout=timeout, metadata=self._metadata(metadata)
            )
            async for msg in call:
                result = plan.feed(msg)
                if result is not None:
                    yield result
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    # ---- health

    async def health(
        self, service: str = "", *, timeout: Any = _DEFAULT, metadata: c.Metadata = None
    ) -> str:
        """The health service's status: "SERVING", "NOT_SERVING", ..."""
        req = health_pb2.HealthCheckRequest(service=service)
        status = (await self._call(self._health.Check, req, timeout, metadata)).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
