"""NormalizeStream: chunked batches, whole-batch statistics, and broken chunk protocols."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from normserve.client import Client
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

from ._util import expect_status, tensor, unchanged

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _chunks(sid: str, x: torch.Tensor, splits: list[int], mode: int = pb.MODE_TRAIN):
    parts = x.tensor_split(splits)
    for i, part in enumerate(parts):
        req = pb.NormalizeStreamRequest(chunk=tensor(part), end_of_batch=i == len(parts) - 1)
        if i == 0:
            req.session_id, req.mode = sid, mode
        yield req


def test_chunked_batch_uses_whole_batch_statistics(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(3).session_id
    x = torch.randn(10, 3, 4) * 5 + 2
    answers = list(stub.NormalizeStream(_chunks(sid, x, [3, 4, 8])))
    assert [a.end_of_batch for a in answers] == [False, False, False, True]
    assert answers[0].HasField("mean") and answers[0].version == 2
    out = torch.cat(
        [
            torch.frombuffer(bytearray(a.chunk.data), dtype=torch.float32).view(list(a.chunk.shape))
            for a in answers
        ]
    )
    bn = torch.nn.BatchNorm1d(3)
    torch.testing.assert_close(out, bn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(client.get_session(sid).running_var, bn.running_var)


def test_many_batches_answered_in_order(client: Client) -> None:
    sid = client.create_session(2).session_id
    batches = [torch.randn(n, 2) * (n + 1) for n in (2, 5, 3, 7)]
    results = list(client.normalize_stream(sid, batches))
    assert [r.version for r in results] == [2, 3, 4, 5]
    bn = torch.nn.BatchNorm1d(2)
    for x, r in zip(batches, results, strict=True):
        torch.testing.assert_close(r.output, bn(x), atol=1e-5, rtol=1e-5)


def test_large_batch_is_chunked_below_grpc_default(client: Client) -> None:
    """A 6 MB batch through the client: every message must stay under 4 MiB."""
    sid = client.create_session(16, momentum=None).session_id
    x = torch.randn(96, 16, 32, 32)  # 6.3 MB
    from normserve.client._tensors import StreamPlan

    sizes = [len(r) for r in StreamPlan(sid, "train", False, client.chunk_bytes).batch_requests(x)]
    assert len(sizes) > 1 and max(sizes) < 1.1 * (1 << 20)
    r = client.normalize(sid, x)
    bn = torch.nn.BatchNorm2d(16, momentum=None)
    torch.testing.assert_close(r.output, bn(x), atol=1e-5, rtol=1e-5)


def test_statistics_only_stream(client: Client) -> None:
    sid = client.create_session(2).session_id
    (r,) = client.normalize_stream(sid, [torch.randn(6, 2)], statistics_only=True)
    assert r.output is None and r.version == 2


def _expect_stream_error(
    stub: pb_grpc.NormalizerStub, requests: Iterator[pb.NormalizeStreamRequest], message: str
) -> None:
    with expect_status(INVALID, message):
        list(stub.NormalizeStream(requests))


def test_chunks_disagreeing_in_shape(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = client.create_session(3).session_id
    reqs = [
        pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(2, 3, 4))
        ),
        pb.NormalizeStreamRequest(chunk=tensor(torch.randn(2, 3, 5)), end_of_batch=True),
    ]
    with unchanged(client, sid):
        _expect_stream_error(
            stub,
            iter(reqs),
            "chunk.shape: chunks of one batch may differ only in dim 0: expected [*, 3, 4], got [2, 3, 5]",
        )


def test_chunks_disagreeing_in_dtype(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = client.create_session(3).session_id
    reqs = [
        pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(2, 3))
        ),
        pb.NormalizeStreamRequest(chunk=tensor(torch.randn(2, 3).half()), end_of_batch=True),
    ]
    with unchanged(client, sid):
        _expect_stream_error(
            stub,
            iter(reqs),
            "chunk.dtype: chunks of one batch must share a dtype: expected float32, got float16",
        )


def test_stream_ending_mid_batch_applies_nothing(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(3).session_id
    reqs = [
        pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(4, 3))
        )
    ]
    with unchanged(client, sid):
        _expect_stream_error(
            stub,
            iter(reqs),
            "end_of_batch: the stream ended in the middle of batch 0 (no chunk set end_of_batch); "
            "nothing of that batch was applied",
        )


def test_completed_batches_stay_applied_when_a_later_one_fails(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(3).session_id
    reqs = [
        *_chunks(sid, torch.randn(4, 3), [2]),
        pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(4, 3))
        ),
    ]
    with pytest.raises(grpc.RpcError):
        list(stub.NormalizeStream(iter(reqs)))
    assert client.get_session(sid).num_batches_tracked == 1


def test_later_chunk_naming_another_session(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = client.create_session(3).session_id
    reqs = [
        pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(2, 3))
        ),
        pb.NormalizeStreamRequest(
            session_id="other", chunk=tensor(torch.randn(2, 3)), end_of_batch=True
        ),
    ]
    with unchanged(client, sid):
        _expect_stream_error(
            stub,
            iter(reqs),
            f"session_id: a later chunk of batch 0 names session 'other', the first named '{sid}'; "
            "nothing of that batch was applied",
        )


def test_nan_in_a_later_chunk_applies_nothing(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = client.create_session(3).session_id
    bad = torch.randn(3, 3)
    bad[1, 2] = float("nan")
    reqs = [
        pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(3, 3))
        ),
        pb.NormalizeStreamRequest(chunk=tensor(bad), end_of_batch=True),
    ]
    with unchanged(client, sid):
        _expect_stream_error(
            stub,
            iter(reqs),
            "chunk: contains NaN or Inf, or values whose statistics exceed float32's range "
            "(|mean| or variance > 3.4e38); nothing was applied",
        )


def test_empty_batch(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = client.create_session(3).session_id
    reqs = [pb.NormalizeStreamRequest(session_id=sid, mode=pb.MODE_TRAIN, end_of_batch=True)]
    with unchanged(client, sid):
        _expect_stream_error(
            stub, iter(reqs), "chunk: the batch ended without any chunk; nothing was applied"
        )


def test_eval_chunks_are_answered_as_they_arrive(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    """EVAL with running statistics needs nothing from later chunks: each chunk is answered at
    once, so the sender may wait for an answer before sending the next chunk."""
    import threading

    sid = client.create_session(3).session_id
    client.normalize(sid, torch.randn(16, 3) * 2 + 1)  # running statistics to use
    x = torch.randn(6, 3, 4)
    answered = threading.Event()

    def requests():
        yield pb.NormalizeStreamRequest(session_id=sid, mode=pb.MODE_EVAL, chunk=tensor(x[:2]))
        assert answered.wait(10), "the first chunk was not answered before the batch ended"
        yield pb.NormalizeStreamRequest(chunk=tensor(x[2:]), end_of_batch=True)

    chunks = []
    for answer in stub.NormalizeStream(requests(), timeout=20):
        answered.set()
        chunks.append(
            torch.frombuffer(bytearray(answer.chunk.data), dtype=torch.float32).view(
                list(answer.chunk.shape)
            )
        )
        if answer.end_of_batch:
            break
    bn = torch.nn.BatchNorm1d(3)
    bn.load_state_dict(client.export_state(sid))
    bn.eval()
    torch.testing.assert_close(torch.cat(chunks), bn(x).detach(), atol=1e-5, rtol=1e-5)


def test_eval_stream_rejects_a_bad_later_chunk(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    """Answered chunk by chunk, an EVAL batch still fails as a whole on a bad chunk."""
    sid = client.create_session(3).session_id
    bad = torch.randn(3, 3)
    bad[0, 1] = float("inf")
    reqs = [
        pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_EVAL, chunk=tensor(torch.randn(3, 3))
        ),
        pb.NormalizeStreamRequest(chunk=tensor(bad), end_of_batch=True),
    ]
    with unchanged(client, sid):
        _expect_stream_error(stub, iter(reqs), "chunk: contains NaN or Inf; nothing was applied")
