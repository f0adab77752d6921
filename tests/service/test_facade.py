"""The service facade and the store on their own: ordering with deletes, compare-and-set commits,
and where compute runs."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from normserve.server.service import (
    Conflict,
    MemoryStore,
    Mode,
    NormalizeCall,
    NormalizerService,
    NotFound,
    ResourceExhausted,
    SessionConfig,
    SessionManager,
)


@pytest.fixture
def manager() -> SessionManager:
    return SessionManager("cpu")


def test_store_commits_only_from_the_version_it_was_computed_from(manager: SessionManager) -> None:
    store = MemoryStore()
    s = manager.create(SessionConfig(2))
    first = s.state
    with pytest.raises(Conflict):
        store.commit("a", first, 0)  # no such session yet
    store.create("a", s.record, first)
    with pytest.raises(Conflict):
        store.create("a", s.record, first)  # not a new session any more
    with pytest.raises(Conflict):
        store.commit("a", first.advanced(), 0)
    nxt = first.advanced()
    store.commit("a", nxt, first.version)
    with pytest.raises(Conflict):
        store.commit("a", nxt.advanced(), first.version)  # stale: computed from the old one
    assert store.read("a") is nxt
    store.drop("a")
    with pytest.raises(KeyError):
        store.read("a")


def test_delete_lets_an_update_in_flight_commit_first(manager: SessionManager) -> None:
    s = manager.create(SessionConfig(2))
    s._lock.acquire()  # an update in flight holds the session's lock
    deleted = threading.Event()
    t = threading.Thread(target=lambda: (manager.delete(s.session_id), deleted.set()))
    t.start()
    assert not deleted.wait(0.2), "delete did not wait for the update in flight"
    assert s.state.version == 1  # the state is still there for that update to commit on
    s._lock.release()
    t.join(5)
    assert deleted.is_set()
    with pytest.raises(NotFound, match="was deleted"):
        s.normalize(torch.randn(4, 2), Mode.TRAIN)


def test_a_chunked_batch_finishing_after_a_delete_is_not_found(manager: SessionManager) -> None:
    s = manager.create(SessionConfig(2))
    batch = s.start_batch(Mode.TRAIN)
    batch.add(torch.randn(4, 2))
    manager.delete(s.session_id)
    with pytest.raises(NotFound, match="was deleted"):
        batch.finish()


def _call(session_id: str, x: torch.Tensor, mode: Mode = Mode.TRAIN) -> NormalizeCall:
    return NormalizeCall(session_id, lambda: mode, lambda: x)


def test_a_small_call_never_blocks_the_loop_on_a_busy_session(manager: SessionManager) -> None:
    """Small calls run on the event loop, but one that finds its session's lock taken goes to the
    pool: the loop keeps serving other calls meanwhile."""
    service = NormalizerService(manager, workers=2)
    busy = manager.create(SessionConfig(4))
    other = manager.create(SessionConfig(4))

    async def scenario() -> None:
        busy._lock.acquire()
        # a backstop, so that a loop blocked on the lock (the bug) ends instead of hanging
        backstop = threading.Timer(5, busy._lock.release)
        backstop.start()
        waiting = asyncio.ensure_future(
            service.normalize(_call(busy.session_id, torch.randn(8, 4)), lambda r: r)
        )
        await asyncio.sleep(0.05)
        assert not waiting.done()
        # the loop is free: another session's call is answered while the first still waits
        r = await service.normalize(_call(other.session_id, torch.randn(8, 4)), lambda r: r)
        assert r.version == 2
        assert busy._lock.locked(), "the other call was answered only once the lock was freed"
        backstop.cancel()
        busy._lock.release()
        assert (await asyncio.wait_for(waiting, 5)).version == 2

    try:
        asyncio.run(scenario())
    finally:
        service.close()


def test_a_call_whose_answer_cannot_be_sent_changes_nothing(manager: SessionManager) -> None:
    service = NormalizerService(manager, max_answer_bytes=64 * 1024)
    s = manager.create(SessionConfig(64))
    x = torch.randn(256, 64)  # 64 KiB of output, plus the statistics and headers
    try:
        with pytest.raises(ResourceExhausted, match="nothing was applied"):
            asyncio.run(service.normalize(_call(s.session_id, x), lambda r: r))
        assert s.state.version == 1
        # statistics only: no output to send, so it fits
        call = NormalizeCall(s.session_id, lambda: Mode.TRAIN, lambda: x, statistics_only=True)
        assert asyncio.run(service.normalize(call, lambda r: r)).version == 2
    finally:
        service.close()
