"""The Redis store against a real redis-server: MemoryStore's semantics, exactly-once updates from
many processes, what survives SIGKILL of Redis, Redis down and back, idle TTLs, corrupt bytes."""

from __future__ import annotations

import multiprocessing
import random
import re
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import torch

from normserve.server.service._config import SessionConfig
from normserve.server.service._state import SessionState
from normserve.server.service.stores import (
    AlreadyApplied,
    Applied,
    Conflict,
    CorruptData,
    Idempotency,
    KeyPolicy,
    MemoryStore,
    SessionRecord,
    StoreUnavailable,
)
from normserve.server.service.stores._redis import RedisStore
from tests._redis import RedisServer, redis_server_binary

C = 4


def make(uid: str = "u", ttl: float = 0.0, c: int = C) -> tuple[SessionRecord, SessionState]:
    record = SessionRecord(SessionConfig(num_features=c), time.time(), uid, ttl)
    state = SessionState(
        version=0,
        num_batches_tracked=0,
        running_mean=torch.zeros(c, dtype=torch.float64),
        running_var=torch.ones(c, dtype=torch.float64),
        weight=torch.ones(c),
        bias=None,
        update_time=time.time(),
        uid=uid,
    )
    return record, state


def value_of(idempotency_key: str) -> float:
    return (zlib.crc32(idempotency_key.encode()) % 1000) / 100.0


def step(state: SessionState, idempotency_key: str) -> SessionState:
    """A deterministic update whose result depends on the order of updates (as an EMA does)."""
    assert state.running_mean is not None and state.running_var is not None
    v = value_of(idempotency_key)
    return state.advanced(
        num_batches_tracked=state.num_batches_tracked + 1,
        running_mean=state.running_mean * 0.5 + v * torch.arange(1, C + 1, dtype=torch.float64),
        running_var=state.running_var * 0.9 + v,
    )


def apply_once(store: Any, key: str, idempotency_key: str) -> int:
    """latest / compute / commit until it lands (or was applied before); the version it produced."""
    while True:
        current = store.latest(key)
        try:
            store.commit(key, step(current, idempotency_key), current.version,
                         Idempotency(idempotency_key, "fp"))  # fmt: skip
            return int(current.version) + 1
        except Conflict:
            continue
        except AlreadyApplied as done:
            return done.applied.version


def replay(keys_in_order: list[str]) -> SessionState:
    _, state = make()
    for k in keys_in_order:
        state = step(state, k)
    return state


def same_numbers(a: SessionState, b: SessionState) -> bool:
    def eq(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return (
        a.version == b.version
        and a.num_batches_tracked == b.num_batches_tracked
        and all(
            eq(getattr(a, n), getattr(b, n))
            for n in ("running_mean", "running_var", "weight", "bias")
        )
    )


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    s = RedisStore(redis_server.url, key_policy=KeyPolicy(max_keys=3, window_seconds=0.5))
    yield s
    s.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_server.url)
    yield r
    r.close()


# ---- the same behaviour as the memory store


def scenario(store: Any) -> list[object]:
    """Every operation's outcome, as comparable values."""
    seen: list[object] = []

    def outcome(fn: Any, *args: Any) -> object:
        try:
            got = fn(*args)
        except Conflict as err:
            return ("Conflict", None if err.current is None else err.current.version)
        except AlreadyApplied as err:
            return ("AlreadyApplied", err.applied)
        except KeyError:
            return "KeyError"
        if isinstance(got, SessionState):
            return ("state", got.version, got.num_batches_tracked, got.running_mean.tolist())  # type: ignore[union-attr]
        if isinstance(got, tuple):
            return ("loaded", got[0].uid, got[0].config, got[1].version)
        return got

    rec, s0 = make("u1")
    other_rec, other = make("u2")
    seen.append(outcome(store.create, "t/a", rec, s0))
    seen.append(outcome(store.create, "t/a", other_rec, other))
    seen.append(outcome(store.load, "t/a"))
    seen.append(outcome(store.load, "t/nope"))
    seen.append(outcome(store.read, "t/nope"))
    s1 = step(s0, "k1")
    seen.append(outcome(store.commit, "t/a", s1, 0, Idempotency("k1", "fp")))
    seen.append(outcome(store.commit, "t/a", step(s1, "k1"), 1, Idempotency("k1", "fp")))
    seen.append(outcome(store.commit, "t/a", step(s0, "k2"), 0, Idempotency("k2", "fp")))
    seen.append(outcome(store.commit, "t/a", step(s0, "k3"), 0))
    seen.append(outcome(store.read, "t/a"))
    seen.append(outcome(store.latest, "t/a"))
    seen.append(outcome(store.applied, "t/a", "k1"))
    seen.append(outcome(store.applied, "t/a", "k2"))
    # the count bound (3): k1 is forgotten after three more keys, and would be applied again
    state = store.read("t/a")
    for k in ("k4", "k5", "k6"):
        state = step(state, k)
        seen.append(outcome(store.commit, "t/a", state, state.version - 1, Idempotency(k, "fp")))
    seen.append([outcome(store.applied, "t/a", k) for k in ("k1", "k4", "k5", "k6")])
    # past the window (0.5 s) applied() forgets every key; a commit still refuses one until a
    # commit forgets it (the memory store's rule: remembering longer is the safe side)
    time.sleep(0.6)
    seen.append([outcome(store.applied, "t/a", k) for k in ("k4", "k5", "k6")])
    seen.append(
        outcome(store.commit, "t/a", step(state, "k6"), state.version, Idempotency("k6", "f"))
    )
    for key in ("t/b", "t/c", "u/a", "t/ab", "tenant/x", "é/1", "t/a/b"):
        seen.append(outcome(store.create, key, *make(key)))
    for prefix, after, limit in [
        ("", "", 0), ("t/", "", 0), ("t/", "t/a", 0), ("t/", "t/a", 2), ("", "t/c", 2),
        ("u/", "", 1), ("x", "", 0), ("", "tenant/x", 0), ("t/", "zzz", 0), ("é", "", 0),
    ]:  # fmt: skip
        seen.append(("keys", prefix, after, limit, store.keys(prefix, after, limit)))
    # drop: gone everywhere, its keys forgotten; created again it is another session
    seen.append(outcome(store.drop, "t/a"))
    seen.append(outcome(store.drop, "t/a"))
    seen.append(outcome(store.load, "t/a"))
    seen.append(outcome(store.read, "t/a"))
    seen.append(outcome(store.commit, "t/a", step(state, "k9"), state.version))
    seen.append(store.keys("t/"))
    seen.append(outcome(store.create, "t/a", *make("u3")))
    seen.append(outcome(store.applied, "t/a", "k6"))
    seen.append(outcome(store.read, "t/a"))
    return seen


def test_behaves_as_the_memory_store(store: RedisStore) -> None:
    memory = scenario(MemoryStore(store.key_policy))
    assert scenario(store) == memory
    assert ("keys", "t/", "t/a", 2, ["t/a/b", "t/ab"]) in memory  # the scenario does page


def test_keys_pages_through_many_sessions_past_expired_ones(
    store: RedisStore, raw: redis.Redis
) -> None:
    names = [f"t/{i:05d}" for i in range(2100)]
    for i, name in enumerate(names):
        store.create(name, *make(name, ttl=0.2 if i % 3 else 0.0))
    time.sleep(0.3)
    live = names[::3]
    assert store.keys("t/", "", 5) == live[:5]
    paged: list[str] = []
    while page := store.keys("t/", paged[-1] if paged else "", 150):
        assert len(page) == 150 or len(paged) + len(page) == len(live)
        paged += page
    assert paged == live and store.keys() == live
    assert raw.zcard(b"normserve:index") == len(live)


def test_without_redis_server_tests_skip_but_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMSERVE_REDIS_SERVER", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        redis_server_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have it"):
        redis_server_binary()


def test_round_trips_a_state_exactly_and_answers_conflicts_with_the_current_state(
    store: RedisStore,
) -> None:
    record, s0 = make("u1", c=256)
    s0 = SessionState(0, 7, torch.randn(256), torch.rand(256), None, torch.randn(256), 1.5, "u1")
    store.create("s", record, s0)
    loaded = store.load("s")
    assert loaded is not None and loaded[0] == record and same_numbers(loaded[1], s0)
    s1 = s0.advanced(running_mean=torch.randn(256))
    store.commit("s", s1, 0)
    with pytest.raises(Conflict) as err:
        store.commit("s", s0.advanced(), 0)
    assert err.value.current is not None and same_numbers(err.value.current, s1)


def test_a_retried_write_whose_answer_was_lost_succeeds(store: RedisStore) -> None:
    """redis-py resends a script after a lost connection: the same bytes again are not a
    conflict with themselves."""
    record, s0 = make()
    store.create("s", record, s0)
    store.create("s", record, s0)
    s1 = step(s0, "k")
    store.commit("s", s1, 0)
    store.commit("s", s1, 0)
    assert store.read("s").version == 1


def test_latest_is_this_process_s_last_view_and_a_stale_one_conflicts(
    redis_server: RedisServer,
) -> None:
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    record, s0 = make("u1")
    a.create("s", record, s0)
    assert a.latest("s").version == 0 and b.latest("s").version == 0
    b.commit("s", step(s0, "x"), 0)
    assert a.latest("s").version == 0  # a's view, no round trip
    with pytest.raises(Conflict) as err:
        a.commit("s", step(a.latest("s"), "y"), 0)
    assert err.value.current is not None and err.value.current.version == 1
    assert a.latest("s").version == 1  # the conflict refreshed it
    # b drops the session and creates another under the key, and brings it to version 1 too:
    # a's cached state (version 1 of the old session) must not commit on top of it
    b.drop("s")
    record2, t0 = make("u2")
    b.create("s", record2, t0)
    b.commit("s", step(t0, "z"), 0)
    with pytest.raises(Conflict) as err:
        a.commit("s", step(a.latest("s"), "w"), 1)
    assert err.value.current is not None and err.value.current.uid == "u2"
    assert a.latest("s").uid == "u2"
    a.close()
    b.close()


def test_the_view_cache_is_bounded(redis_server: RedisServer) -> None:
    s = RedisStore(redis_server.url, cache_entries=3)
    for i in range(10):
        s.create(f"s{i}", *make(f"u{i}"))
    assert len(s._seen) == 3 and list(s._seen) == ["s7", "s8", "s9"]
    assert s.latest("s0").version == 0  # read from Redis
    s.close()


# ---- exactly once, across processes and threads


def _writer(
    url: str, key: str, proc: int, threads: int, per_thread: int
) -> list[tuple[str, int, bool]]:
    store = RedisStore(url, key_policy=KeyPolicy(max_keys=100_000))
    acks: list[tuple[str, int, bool]] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        rng = random.Random(proc * 1000 + t)
        mine: list[tuple[str, int]] = []
        for n in range(per_thread):
            k = f"p{proc}-t{t}-n{n}"
            version = apply_once(store, key, k)
            mine.append((k, version))
            with lock:
                acks.append((k, version, False))
            if rng.random() < 0.25:  # a client retrying an update whose answer it lost
                old = rng.choice(mine)[0]
                with lock:
                    acks.append((old, apply_once(store, key, old), True))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    store.close()
    return acks


def test_concurrent_updates_from_many_processes_apply_exactly_once_in_one_order(
    store: RedisStore, redis_server: RedisServer
) -> None:
    processes, threads, per_thread = 4, 8, 12
    store.key_policy = KeyPolicy(max_keys=100_000)
    store.create("s", *make())
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        results = pool.starmap(
            _writer, [(redis_server.url, "s", p, threads, per_thread) for p in range(processes)]
        )
    acks = [a for r in results for a in r]
    first = {k: v for k, v, retry in acks if not retry}
    total = processes * threads * per_thread
    assert len(first) == total
    # every key produced one version, the versions are 1..N without a gap, and every retry was
    # answered with the version its key produced
    assert sorted(first.values()) == list(range(1, total + 1))
    assert all(first[k] == v for k, v, retry in acks if retry)
    assert any(retry for _, _, retry in acks)
    final = store.read("s")
    in_order = sorted(first, key=first.__getitem__)
    assert same_numbers(final, replay(in_order))
    assert all(store.applied("s", k) == Applied(v, "fp") for k, v in first.items())


# ---- durability: Redis killed, restarted; Redis down


def test_acknowledged_updates_survive_sigkill_of_redis(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """A writer keeps going while Redis is SIGKILLed and restarted under it (appendfsync always):
    it retries through StoreUnavailable with its idempotency keys, and at the end every update
    is there exactly once."""
    store.key_policy = KeyPolicy(max_keys=10_000)
    store.create("s", *make())
    acked: list[int] = []
    unavailable = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal unavailable
        i = 0
        while not stop.is_set() or i < 50:
            try:
                acked.append(apply_once(store, "s", f"k{i}"))
                i += 1
            except StoreUnavailable:
                unavailable += 1  # the same key again: applied once whether or not it ran
                time.sleep(0.01)

    th = threading.Thread(target=writer)
    th.start()
    for _ in range(3):
        time.sleep(0.15)
        redis_server.kill()
        before = len(acked)
        time.sleep(0.3)  # longer than redis-py's own retries: the writer sees Redis down
        redis_server.restart()
        assert store.read("s", touch=False).version >= before  # nothing acknowledged was lost
    stop.set()
    th.join(30)
    assert not th.is_alive()
    n = len(acked)
    assert unavailable > 0 and acked == list(range(1, n + 1))
    fresh = RedisStore(redis_server.url)
    assert same_numbers(fresh.read("s"), replay([f"k{i}" for i in range(n)]))
    fresh.close()


def test_redis_down_is_unavailable_and_the_store_recovers_by_itself(
    store: RedisStore, redis_server: RedisServer
) -> None:
    store.key_policy = KeyPolicy()
    record, s0 = make()
    store.create("s", record, s0)
    store.commit("s", step(s0, "a"), 0, Idempotency("a", "fp"))
    redis_server.kill()
    s1 = store.latest("s")  # this process's view needs no Redis
    calls = {
        "create": lambda: store.create("t", *make("u9")),
        "load": lambda: store.load("s"),
        "read": lambda: store.read("s"),
        "read untouched": lambda: store.read("s", touch=False),
        "commit": lambda: store.commit("s", step(s1, "b"), 1, Idempotency("b", "fp")),
        "applied": lambda: store.applied("s", "a"),
        "drop": lambda: store.drop("s"),
        "keys": lambda: store.keys(),
        "expire_time": lambda: store.expire_time("s"),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"Redis at {re.escape(redis_server.url)}, is "):
            call()
        assert time.monotonic() - started < 2.0, name
    hidden = RedisStore(redis_server.url.replace("//", "//:hunter2@"))
    with pytest.raises(StoreUnavailable) as err:
        hidden.read("s")
    assert "hunter2" not in str(err.value) and redis_server.url in str(err.value)
    hidden.close()
    redis_server.restart()
    # the same store, not rebuilt: its pooled connections died with Redis
    assert store.read("s").version == 1
    store.commit("s", step(s1, "b"), 1, Idempotency("b", "fp"))
    assert store.applied("s", "a") == Applied(1, "fp") and store.keys() == ["s"]


# ---- idle TTLs: Redis itself frees expired sessions


def test_an_idle_session_expires_in_redis_and_a_used_one_does_not(
    store: RedisStore, raw: redis.Redis
) -> None:
    record, s0 = make(ttl=0.4)
    store.create("s", record, s0)
    store.create("forever", *make())
    store.commit("s", step(s0, "k"), 0, Idempotency("k", "fp"))
    redis_keys = [b"normserve:s:{s}", b"normserve:i:{s}", b"normserve:z:{s}"]
    assert all(0 < raw.pttl(k) <= 400 for k in redis_keys)
    expires = store.expire_time("s")
    assert expires is not None and time.time() < expires <= time.time() + 0.4
    assert store.expire_time("forever") is None and store.expire_time("nope") is None
    for _ in range(6):  # used every 0.1 s for 0.6 s: alive
        time.sleep(0.1)
        store.read("s")
    time.sleep(0.15)
    store.read("s", touch=False)  # not a use
    store.latest("s")
    time.sleep(0.35)
    with pytest.raises(KeyError):
        store.read("s")
    assert store.load("s") is None and raw.exists(*redis_keys) == 0
    with pytest.raises(Conflict) as err:
        store.commit("s", step(step(s0, "k"), "j"), 1)
    assert err.value.current is None
    assert raw.zcard(b"normserve:index") == 2
    assert store.keys() == ["forever"]
    assert raw.zrange(b"normserve:index", 0, -1) == [b"forever"]  # forgotten as met


# ---- corrupt bytes are detected, never loaded as numbers


@pytest.mark.parametrize("damage", ["garbage", "bit flip", "truncated"])
def test_a_corrupt_state_in_redis_raises_corrupt_data(
    store: RedisStore, raw: redis.Redis, damage: str
) -> None:
    record, s0 = make(c=64)
    store.create("s", record, s0)
    good = raw.hget(b"normserve:s:{s}", "state")
    assert good is not None
    bad = {
        "garbage": b"\x00garbage" * 10,
        "bit flip": good[:-9] + bytes([good[-9] ^ 0x01]) + good[-8:],  # inside weight
        "truncated": good[: len(good) // 2],
    }[damage]
    raw.hset(b"normserve:s:{s}", "state", bad)
    with pytest.raises(CorruptData, match="session 's': its state in Redis is corrupt"):
        store.read("s")
    with pytest.raises(CorruptData):
        store.load("s")
    with pytest.raises(CorruptData):
        store.commit("s", s0.advanced(), 5)  # the conflict's current state cannot be decoded


def test_a_corrupt_record_in_redis_raises_corrupt_data(store: RedisStore, raw: redis.Redis) -> None:
    store.create("s", *make())
    raw.hset(b"normserve:s:{s}", "rec", b'{"config": {}}')
    with pytest.raises(CorruptData, match="its record in Redis is corrupt"):
        store.load("s")


@pytest.mark.parametrize(
    "error",
    [
        redis.BusyLoadingError("Redis is loading the dataset in memory"),
        redis.TimeoutError("Timeout reading from socket"),
        redis.ReadOnlyError("You can't write against a read only replica."),
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        redis.ResponseError("MISCONF Errors writing to the AOF file: No space left on device"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_redis_refusing_for_now_is_unavailable(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Redis loading its AOF after a restart, slow, demoted or full: nothing ran, retry later."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(store._redis, "hget", refuse)
    with pytest.raises(StoreUnavailable, match=re.escape(str(error))):
        store.read("s", touch=False)


def test_a_bug_in_a_command_is_not_unavailable(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise redis.ResponseError("ERR wrong number of arguments")

    monkeypatch.setattr(store._redis, "hget", refuse)
    with pytest.raises(redis.ResponseError):
        store.read("s", touch=False)
