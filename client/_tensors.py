"""What the clients do with tensors: accept torch tensors or numpy arrays, encode batches (one
message, or chunks along dim 0 for a stream), and give results back in the caller's kind.

Imported on first use by the clients' tensor methods, so that ``normserve.client`` itself, and the
operator commands, load without torch.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from normserve import wire
from normserve.client._common import ModeName, NormalizeResult, mode_value, new_idempotency_key
from normserve.v1 import normserve_pb2 as pb
from normserve.wire import tensor_from_proto, tensor_to_proto

__all__ = ["ArrayLike", "StreamPlan", "as_tensor", "normalize_request", "normalize_result"]

ArrayLike = torch.Tensor | np.ndarray


def as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


#: What a batch may be: the server normalizes these (int64 travels only as num_batches_tracked).
BATCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_batch(x: ArrayLike) -> torch.Tensor:
    """``x`` as a tensor to normalize, refused here (TypeError) when its dtype is not one the
    server normalizes, rather than after a round trip."""
    t = as_tensor(x)
    if t.dtype not in BATCH_DTYPES:
        name = str(t.dtype).removeprefix("torch.")
        raise TypeError(
            f"cannot normalize {name} data: a batch must be float32, float16, bfloat16 or float64 "
            f"(convert it first, e.g. x.float())"
        )
    return t


def import_request(
    session_id: str, state: Mapping[str, ArrayLike], strict: bool
) -> pb.ImportStateRequest:
    entries = [
        pb.NamedTensor(name=key, tensor=tensor_to_proto(as_tensor(value)))
        for key, value in state.items()
    ]
    return pb.ImportStateRequest(session_id=session_id, entries=entries, strict=strict)


def state_dict(msg: pb.ExportStateResponse) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((e.name, tensor_from_proto(e.tensor, e.name).clone()) for e in msg.entries)


# ---- normalization: how a batch of the caller's type comes back as the same type


@dataclass(frozen=True)
class _Like:
    """What the caller sent, so the output can be given back in kind."""

    numpy: bool
    device: torch.device

    @staticmethod
    def of(x: ArrayLike) -> _Like:
        if isinstance(x, np.ndarray):
            return _Like(True, torch.device("cpu"))
        return _Like(False, x.device)

    def give(self, t: torch.Tensor | None) -> Any:
        if t is None:
            return None
        if self.numpy:
            return t.numpy()
        return t if self.device.type == "cpu" else t.to(self.device)


#: What a message of ``chunk_bytes`` leaves for everything but its tensor's data: the server
#: refuses a call whose answer (data, 8 bytes a feature of statistics, and 4 KiB it reserves for
#: headers) would pass its --max-message-bytes, and a request's own header (ids, shape) is far
#: smaller. So a client whose ``chunk_bytes`` equals the server's --max-message-bytes sends chunks
#: of ``chunk_bytes - CHUNK_MARGIN_BYTES - 8 * features`` bytes of data, whose requests and
#: answers both fit. (Sizes under twice the margin, below any server's smallest limit, are taken
#: as data sizes, for tests and tiny rows.)
CHUNK_MARGIN_BYTES = 4096


def payload_bytes(x: torch.Tensor, chunk_bytes: int) -> int:
    """The most data bytes of ``x`` one message of ``chunk_bytes`` carries (see above)."""
    if chunk_bytes < 2 * CHUNK_MARGIN_BYTES:
        return chunk_bytes
    features = x.shape[1] if x.dim() > 1 else 0
    return chunk_bytes - CHUNK_MARGIN_BYTES - 8 * features


def fits_unary(x: torch.Tensor, chunk_bytes: int) -> bool:
    return x.numel() * x.element_size() <= payload_bytes(x, chunk_bytes)


def normalize_request(
    session_id: str,
    x: torch.Tensor,
    mode: ModeName | str,
    statistics_only: bool,
    idempotency_key: str = "",
    sync: tuple[int, int] | None = None,
    time_step: int = 0,
    adaptation: tuple[float, bool] | None = None,
) -> bytes:
    """An encoded NormalizeRequest: one copy of the tensor (see normserve.wire)."""
    return wire.encode_normalize_request(
        session_id,
        mode_value(mode),
        x,
        statistics_only,
        idempotency_key,
        sync,
        time_step,
        adaptation,
    )


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    # Received tensors view the response's immutable bytes; the clone makes them writable and
    # independent (one copy, the price of handing the caller an ordinary tensor).
    return None if t is None else t.clone()


def normalize_result(raw: bytes, like: _Like) -> NormalizeResult:
    answer = wire.parse_normalize_response(raw)
    assert answer.mean is not None and answer.var is not None
    return NormalizeResult(
        output=like.give(_own(answer.output)),
        mean=answer.mean.clone(),
        var=answer.var.clone(),
        version=answer.version,
        batch_statistics=answer.batch_statistics,
        replayed=answer.replayed,
    )


def rows_per_chunk(x: torch.Tensor, chunk_bytes: int) -> int:
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 1
    return max(1, payload_bytes(x, chunk_bytes) // max(row_bytes, 1))


class StreamPlan:
    """Turns batches into chunk requests and answers back into results, for one stream.

    The request side records, per batch, how to give the output back; answers come in batch order,
    so the response side pops those records in the same order.
    """

    def __init__(
        self,
        session_id: str,
        mode: ModeName | str,
        statistics_only: bool,
        chunk_bytes: int,
        idempotency_keys: Iterator[str] | None = None,
        time_step: int = 0,
        sync: tuple[int, int] | None = None,
        adaptation: tuple[float, bool] | None = None,
    ) -> None:
        """``idempotency_keys``: one per batch that changes state (TRAIN, CALIBRATE, an
        accumulating adaptation; default: a fresh UUID each); ``time_step``: every batch's
        (recurrent batch norm); ``sync``: (rank, step) of the first batch of a synchronized
        session, the i-th batch taking step + i; ``adaptation``: every batch's (batch_weight,
        accumulate), on its first chunk."""
        self.session_id = session_id
        self.time_step = time_step
        self._sync = sync
        self.mode = mode_value(mode)
        self.adaptation = adaptation
        #: whether each batch changes state, so carries an idempotency key
        self._keyed = self.mode in (mode_value("train"), mode_value("calibrate")) or (
            adaptation is not None and adaptation[1]
        )
        self._keys = idempotency_keys
        self.statistics_only = statistics_only
        self.chunk_bytes = chunk_bytes
        self._likes: deque[_Like] = deque()
        self._chunks: list[torch.Tensor] = []
        self._header: wire.StreamAnswer | None = None
        self.error: Exception | None = None

    def requests(self, batches: Iterable[ArrayLike]) -> Iterator[bytes]:
        """The chunk messages of every batch. A batch that cannot be sent (a wrong dtype, or the
        caller's iterator failing) ends the stream after the batches before it; the error is kept
        in ``error``, for the client to raise once their answers are in (grpc would otherwise log
        it and report only a cancelled call)."""
        try:
            for batch in batches:
                x = as_batch(batch)
                if x.dim() == 0:
                    raise ValueError("a batch must have at least 2 dimensions ([N, C, ...])")
                self._likes.append(_Like.of(batch))
                yield from self.batch_requests(x)
        except Exception as err:
            self.error = err

    def batch_requests(self, x: torch.Tensor) -> Iterator[bytes]:
        """One batch as encoded chunk messages; the first names session and mode."""
        rows = rows_per_chunk(x, self.chunk_bytes)
        n = x.shape[0]
        starts = list(range(0, n, rows)) or [0]
        last = len(starts) - 1
        key = ""
        if self._keyed:
            key = next(self._keys) if self._keys is not None else new_idempotency_key()
        sync = self._sync
        if sync is not None:
            self._sync = (sync[0], sync[1] + 1)
        for i, start in enumerate(starts):
            chunk = x[start : start + rows]
            if i == 0:
                yield wire.encode_stream_request(
                    self.session_id,
                    self.mode,
                    chunk,
                    last == 0,
                    self.statistics_only,
                    key,
                    self.time_step,
                    sync,
                    self.adaptation,
                )
            else:
                yield wire.encode_stream_request("", 0, chunk, i == last, False)

    def feed(self, raw: bytes) -> NormalizeResult | None:
        """Takes one answer message; returns a result when a batch is complete."""
        msg = wire.parse_stream_response(raw)
        if self._header is None:
            self._header = msg
        if msg.output is not None:
            self._chunks.append(msg.output)
        if not msg.end_of_batch:
            return None
        head, chunks = self._header, self._chunks
        self._header, self._chunks = None, []
        like = self._likes.popleft() if self._likes else _Like(False, torch.device("cpu"))
        output = None
        if chunks:  # cat copies the views into one tensor the caller owns
            output = torch.cat(chunks) if len(chunks) > 1 else chunks[0].clone()
        assert head.mean is not None and head.var is not None
        return NormalizeResult(
            output=like.give(output),
            mean=head.mean.clone(),
            var=head.var.clone(),
            version=head.version,
            batch_statistics=head.batch_statistics,
            replayed=head.replayed,
        )
