"""Synchronized batch norm in the service layer: the group rendezvous and its rules, against one
torch BatchNorm over the concatenated batch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from normserve.server.service import (
    Aborted,
    InvalidArgument,
    Mode,
    NormalizeCall,
    NormalizeResult,
    NormalizerService,
    SessionConfig,
    SessionManager,
    SyncStep,
)


@pytest.fixture
def service() -> Iterator[NormalizerService]:
    svc = NormalizerService(SessionManager("cpu"), workers=2)
    yield svc
    svc.close()


def _call(
    sid: str, x: torch.Tensor, rank: int, step: int, mode: Mode = Mode.TRAIN
) -> NormalizeCall:
    return NormalizeCall(sid, lambda: mode, lambda: x, sync=SyncStep(rank, step))


async def _step(
    svc: NormalizerService, sid: str, xs: list[torch.Tensor], step: int
) -> list[NormalizeResult]:
    def same(r: NormalizeResult) -> NormalizeResult:
        return r

    return list(
        await asyncio.gather(
            *(svc.normalize(_call(sid, x, r, step), same) for r, x in enumerate(xs))
        )
    )


async def _create(svc: NormalizerService, k: int, timeout: float = 30.0, **kw: Any) -> str:
    cfg = SessionConfig(3, sync_participants=k, sync_timeout=timeout, **kw)
    return (await svc.create_session(cfg)).session.session_id


def test_a_step_equals_one_batch_norm_over_the_concatenation_with_unequal_batches(
    service: NormalizerService,
) -> None:
    async def main() -> None:
        sid = await _create(service, 4, momentum=None)
        bn = torch.nn.BatchNorm1d(3, affine=False, momentum=None)
        for step in range(3):
            xs = [torch.randn(n, 3, 5) * 3 + 100 for n in (1, 2, 7, 4)]
            results = await _step(service, sid, xs, step)
            ref = bn(torch.cat(xs))
            out = torch.cat([r.output for r in results])
            assert (out - ref).abs().max() < 1e-5
            assert {r.version for r in results} == {step + 2}
            mean, var = (
                torch.cat(xs).mean(dim=(0, 2)),
                torch.cat(xs).var(dim=(0, 2), unbiased=False),
            )
            for r in results:
                assert r.batch_statistics and not r.replayed
                torch.testing.assert_close(r.mean, mean, rtol=0, atol=1e-4)
                torch.testing.assert_close(r.var, var, rtol=1e-5, atol=1e-5)
        state = service.sessions.get(sid).state
        assert state.num_batches_tracked == 3
        assert state.running_mean is not None and state.running_var is not None
        torch.testing.assert_close(state.running_mean, bn.running_mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(state.running_var, bn.running_var, rtol=1e-5, atol=1e-5)

    asyncio.run(main())


def test_an_empty_share_and_no_running_statistics(service: NormalizerService) -> None:
    async def main() -> None:
        sid = await _create(service, 3, track_running_stats=False)
        xs = [torch.randn(0, 3, 2), torch.randn(3, 3, 2), torch.randn(2, 3, 2)]
        results = await _step(service, sid, xs, 0)
        ref = torch.nn.functional.batch_norm(torch.cat(xs), None, None, training=True)
        out = torch.cat([r.output for r in results])
        assert results[0].output.shape == (0, 3, 2)
        assert (out - ref).abs().max() < 1e-5
        assert {r.version for r in results} == {1}  # nothing kept, nothing changed
        bad = [torch.full((2, 3), float("nan")), torch.randn(2, 3), torch.randn(2, 3)]
        outcomes = await asyncio.gather(
            *(service.normalize(_call(sid, x, r, 1), lambda r: r) for r, x in enumerate(bad)),
            return_exceptions=True,
        )
        assert all(isinstance(e, InvalidArgument) and e.field == "input" for e in outcomes)

    asyncio.run(main())


def test_a_missing_participant_aborts_the_step_for_all_and_changes_nothing(
    service: NormalizerService,
) -> None:
    async def main() -> None:
        sid = await _create(service, 3, timeout=0.2)
        xs = [torch.randn(4, 3) for _ in range(2)]
        t0 = asyncio.get_running_loop().time()
        outcomes = await asyncio.gather(
            *(service.normalize(_call(sid, x, r, 0), lambda r: r) for r, x in enumerate(xs)),
            return_exceptions=True,
        )
        assert asyncio.get_running_loop().time() - t0 < 2
        for err in outcomes:
            assert isinstance(err, Aborted)
            assert str(err) == (
                f"forward step 0 of session {sid!r}: 1 of 3 participants (ranks 2) did not "
                "arrive within 0.2 seconds; nothing was applied"
            )
        assert service.sessions.get(sid).state.version == 1
        # the step was forgotten: all three can send it again
        results = await _step(service, sid, [*xs, torch.randn(2, 3)], 0)
        assert {r.version for r in results} == {2}

    asyncio.run(main())


def test_duplicate_out_of_range_and_stale_are_invalid(service: NormalizerService) -> None:
    async def main() -> None:
        sid = await _create(service, 2)
        x = torch.randn(4, 3)
        first = asyncio.ensure_future(service.normalize(_call(sid, x, 0, 5), lambda r: r))
        await asyncio.sleep(0.05)
        with pytest.raises(InvalidArgument) as dup:
            await service.normalize(_call(sid, x, 0, 5), lambda r: r)
        assert dup.value.field == "sync.rank"
        assert "rank 0 already arrived at forward step 5" in str(dup.value)
        with pytest.raises(InvalidArgument) as out_of_range:
            await service.normalize(_call(sid, x, 2, 5), lambda r: r)
        assert str(out_of_range.value).endswith(
            f"must be in [0, 2) for the 2 participants of session {sid!r}, got 2"
        )
        await service.normalize(_call(sid, x, 1, 5), lambda r: r)
        await first
        for step in range(6, 16):
            await _step(service, sid, [x, x], step)
        with pytest.raises(InvalidArgument) as stale:
            await service.normalize(_call(sid, x, 0, 5), lambda r: r)
        assert stale.value.field == "sync.step"
        assert "step 5 of session" in str(stale.value) and "is stale: step 15" in str(stale.value)
        with pytest.raises(InvalidArgument) as older:
            await service.normalize(_call(sid, x, 1, 3), lambda r: r)
        assert older.value.field == "sync.step"

    asyncio.run(main())


def test_a_retry_of_a_completed_step_gets_the_same_answer_and_applies_nothing(
    service: NormalizerService,
) -> None:
    async def main() -> None:
        sid = await _create(service, 2)
        xs = [torch.randn(4, 3), torch.randn(6, 3)]
        results = await _step(service, sid, xs, 0)
        version = service.sessions.get(sid).state.version
        again = await service.normalize(_call(sid, xs[1], 1, 0), lambda r: r)
        assert again.replayed and again.version == results[1].version == version
        assert torch.equal(again.mean, results[1].mean) and torch.equal(again.var, results[1].var)
        assert again.output is not None and torch.equal(again.output, results[1].output)
        assert service.sessions.get(sid).state.version == version

    asyncio.run(main())


def test_a_cancelled_participant_fails_the_step_for_all_at_once(
    service: NormalizerService,
) -> None:
    async def main() -> None:
        sid = await _create(service, 3, timeout=30)
        x = torch.randn(4, 3)
        waiting = asyncio.ensure_future(service.normalize(_call(sid, x, 0, 0), lambda r: r))
        leaving = asyncio.ensure_future(service.normalize(_call(sid, x, 1, 0), lambda r: r))
        await asyncio.sleep(0.05)
        leaving.cancel()
        with pytest.raises(Aborted, match="participant 1 left forward step 0 of session"):
            await asyncio.wait_for(waiting, 2)  # not the 30 s timeout
        assert service.sessions.get(sid).state.version == 1
        results = await _step(service, sid, [x, x, x], 0)
        assert {r.version for r in results} == {2}

    asyncio.run(main())


def test_eval_is_unsynchronized_and_train_without_sync_is_refused(
    service: NormalizerService,
) -> None:
    async def main() -> None:
        sid = await _create(service, 2)
        x = torch.randn(4, 3)
        plain = NormalizeCall(sid, lambda: Mode.EVAL, lambda: x)
        r = await service.normalize(plain, lambda r: r)
        assert not r.batch_statistics and r.version == 1
        r = await service.normalize(_call(sid, x, 0, 0, Mode.EVAL), lambda r: r)  # sync ignored
        assert not r.batch_statistics
        with pytest.raises(InvalidArgument) as err:
            await service.normalize(NormalizeCall(sid, lambda: Mode.TRAIN, lambda: x), lambda r: r)
        assert err.value.field == "sync"
        with pytest.raises(InvalidArgument, match=r"NormalizeStreamRequest\.sync on a stream"):
            service.sessions.get(sid).start_batch(Mode.TRAIN)
        other = (await service.create_session(SessionConfig(3))).session.session_id
        with pytest.raises(InvalidArgument, match="is not synchronized"):
            await service.normalize(_call(other, x, 0, 0), lambda r: r)

    asyncio.run(main())


def test_backward_sums_meet_in_rank_order(service: NormalizerService) -> None:
    async def main() -> None:
        sid = await _create(service, 3)
        parts = [(torch.randn(3), torch.randn(3), n) for n in (2, 3, 4)]
        got = await asyncio.gather(
            *(service.sync_reduce(sid, SyncStep(r, 0), *p) for r, p in enumerate(parts))
        )
        want = sum(p[0].double() for p in parts)
        for g in got:
            assert g.count == 9 and not g.replayed
            torch.testing.assert_close(g.sum_dy, want.float())
            assert torch.equal(g.sum_dy, got[0].sum_dy)
        again = await service.sync_reduce(sid, SyncStep(2, 0), *parts[2])
        assert again.replayed and torch.equal(again.sum_dy_xhat, got[0].sum_dy_xhat)
        with pytest.raises(InvalidArgument) as err:
            await service.sync_reduce(sid, SyncStep(0, 1), torch.zeros(4), torch.zeros(3), 1)
        assert err.value.field == "sum_dy"

    asyncio.run(main())


def test_config_rules() -> None:
    for cfg, field in (
        (SessionConfig(3, sync_participants=1), "config.sync.participants"),
        (SessionConfig(3, sync_participants=5000), "config.sync.participants"),
        (SessionConfig(3, sync_participants=2, sync_timeout=0), "config.sync.timeout_seconds"),
        (
            SessionConfig.of(_layer_norm(), 0, normalized_shape=(3,), sync_participants=2),
            "config.sync",
        ),
    ):
        with pytest.raises(InvalidArgument) as err:
            cfg.validate()
        assert err.value.field == field


def _layer_norm() -> Any:
    from normserve.server.service import Kind

    return Kind.LAYER_NORM


def test_the_store_chooses_the_rendezvous(redis_server: Any) -> None:
    """A store of this process keeps the in-process rendezvous (the fast path); a Redis store,
    shared across processes, meets participants in Redis and creates synchronized sessions."""
    from normserve.server.service._groups import Groups
    from normserve.server.service._redis_groups import RedisGroups
    from normserve.server.service.stores._redis import RedisStore

    async def main() -> None:
        store = RedisStore(redis_server.url)
        local = NormalizerService(SessionManager("cpu"), workers=1)
        shared = NormalizerService(SessionManager("cpu", store=store), workers=1)
        try:
            assert isinstance(local.groups, Groups)
            assert isinstance(shared.groups, RedisGroups)
            view = await shared.create_session(SessionConfig(3, sync_participants=2))
            assert view.session.config.sync_participants == 2
        finally:
            local.close()
            shared.close()
            store.close()

    asyncio.run(main())
