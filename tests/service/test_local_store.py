"""The local durable store on real files: round trips, crashes (SIGKILL), corrupt and torn files,
the directory lock, and group commit."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from normserve.server.service import SessionConfig, SessionState
from normserve.server.service.stores import (
    AlreadyApplied,
    Applied,
    Idempotency,
    SessionRecord,
    StoreUnavailable,
    Ticket,
)
from normserve.server.service.stores._codec import unframe
from normserve.server.service.stores._local import LocalStore, _Rotate

C = 3


def record(uid: str, affine: bool = True) -> SessionRecord:
    return SessionRecord(SessionConfig(C, momentum=0.25, affine=affine), 1000.5, uid, 60.0)


def state(version: int, uid: str, affine: bool = True) -> SessionState:
    """A state whose every number follows from its version and uid (so any mix-up shows)."""
    salt = sum(map(ord, uid)) / 1000
    params = (torch.full((C,), version * 3.0), torch.full((C,), -salt)) if affine else (None, None)
    return SessionState(
        version=version,
        num_batches_tracked=version - 1,
        running_mean=torch.arange(C, dtype=torch.float32) + version + salt,
        running_var=torch.full((C,), 1.0 + version / 7),
        weight=params[0],
        bias=params[1],
        update_time=2000.0 + version,
        uid=uid,
    )


def same(a: SessionState, b: SessionState) -> bool:
    tensors = ("running_mean", "running_var", "weight", "bias")
    return (a.version, a.num_batches_tracked, a.update_time, a.uid) == (
        b.version,
        b.num_batches_tracked,
        b.update_time,
        b.uid,
    ) and all(
        (getattr(a, t) is None and getattr(b, t) is None)
        or torch.equal(getattr(a, t), getattr(b, t))
        for t in tensors
    )


def wait(ticket: Ticket) -> None:
    if ticket is not None:
        ticket.result(timeout=10)


def advance(store: LocalStore, key: str, uid: str, to: int, affine: bool = True) -> None:
    """Commits versions up to ``to``, each with the idempotency key ``{key}@{version}``."""
    for v in range(store.read(key).version + 1, to + 1):
        wait(store.commit(key, state(v, uid, affine), v - 1, Idempotency(f"{key}@{v}", "fp")))


def until(condition: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture
def opened() -> Iterator[list[LocalStore]]:
    """Stores a test opens, closed at its end whatever happens (close is idempotent)."""
    stores: list[LocalStore] = []
    yield stores
    for s in stores:
        s._abandon()


def open_store(opened: list[LocalStore], path: Path, durability: str, **kw: float) -> LocalStore:
    store = LocalStore(path, durability, kw.pop("snapshot_interval", 3600.0))
    opened.append(store)
    return store


# ---- round trips


@pytest.mark.parametrize("durability", ["interval", "strict"])
def test_round_trip_across_close_and_reopen(
    tmp_path: Path, durability: str, opened: list[LocalStore]
) -> None:
    store = open_store(opened, tmp_path / "state", durability)
    assert (store.shared, store.durable) == (False, True)
    for key, uid, affine in (("a", "ua", True), ("t1/b", "ub", False), ("gone", "ug", True)):
        wait(store.create(key, record(uid, affine), state(1, uid, affine)))
    advance(store, "a", "ua", 6)
    advance(store, "t1/b", "ub", 3, affine=False)
    wait(store.drop("gone"))
    store.close()

    store = open_store(opened, tmp_path / "state", durability)
    assert store.keys() == ["a", "t1/b"]
    assert store.load("gone") is None
    loaded = store.load("a")
    assert loaded is not None and loaded[0] == record("ua")
    assert same(loaded[1], state(6, "ua"))
    assert same(store.read("t1/b"), state(3, "ub", affine=False))
    assert store.recovery["sessions"] == 2 and not store.recovery["errors"]
    # a retried request is answered from the keys that came back, not applied again
    with pytest.raises(AlreadyApplied) as seen:
        store.commit("a", state(7, "ua"), 6, Idempotency("a@4", "fp"))
    assert seen.value.applied == Applied(4, "fp")
    assert store.applied("t1/b", "t1/b@3") == Applied(3, "fp")
    # the dropped id can be created again: another session, which survives the next restart
    wait(store.create("gone", record("ug2"), state(1, "ug2")))
    advance(store, "a", "ua", 8)
    store.close()
    store.close()  # idempotent

    store = open_store(opened, tmp_path / "state", durability)
    assert same(store.read("a"), state(8, "ua"))
    assert same(store.read("gone"), state(1, "ug2"))
    assert store.applied("gone", "gone@2") is None


def test_strict_replays_the_log_over_restarts_without_close(
    tmp_path: Path, opened: list[LocalStore]
) -> None:
    """Three crashes in a row (no close, no last snapshot): the log carries everything, and the
    LSNs stay continuous across the restarts."""
    for generation in range(3):
        store = open_store(opened, tmp_path, "strict")
        if generation == 0:
            wait(store.create("a", record("ua"), state(1, "ua")))
        else:
            assert same(store.read("a"), state(5 * generation, "ua"))
            assert store.recovery["log_records_replayed"] > 0
            assert not store.recovery["errors"]
        advance(store, "a", "ua", 5 * (generation + 1))
        if generation == 1:
            wait(store.drop("a"))
            wait(store.create("a", record("ua"), state(1, "ua")))
            advance(store, "a", "ua", 10)
        store._abandon()
    store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(15, "ua"))


def test_switching_modes_keeps_everything(tmp_path: Path, opened: list[LocalStore]) -> None:
    store = open_store(opened, tmp_path, "strict")
    wait(store.create("a", record("ua"), state(1, "ua")))
    advance(store, "a", "ua", 4)
    store._abandon()  # only the log has it
    store = open_store(opened, tmp_path, "interval")
    assert same(store.read("a"), state(4, "ua"))
    advance(store, "a", "ua", 6)
    store.close()
    store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(6, "ua"))
    advance(store, "a", "ua", 7)
    store._abandon()
    store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(7, "ua"))


def test_a_closed_store_changes_nothing(tmp_path: Path, opened: list[LocalStore]) -> None:
    store = open_store(opened, tmp_path, "strict")
    wait(store.create("a", record("ua"), state(1, "ua")))
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.commit("a", state(2, "ua"), 1)
    with pytest.raises(StoreUnavailable):
        store.create("b", record("ub"), state(1, "ub"))
    assert store.read("a").version == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [(("fast", 5.0), "expected interval or strict"), (("strict", 0.0), "must be > 0")],
)
def test_bad_settings(tmp_path: Path, args: tuple[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LocalStore(tmp_path, *args)


# ---- crashes


CHILD = """
import sys, threading, time
sys.path.insert(0, {tests!r})
from test_local_store import record, state
from normserve.server.service.stores import Idempotency
from normserve.server.service.stores._local import LocalStore

store = LocalStore({path!r}, {durability!r}, {interval!r})
out = threading.Lock()

def say(*words):
    with out:
        print(*words, flush=True)

def run(key):
    uid = "u" + key
    store.create(key, record(uid), state(1, uid)).result()
    v = 1
    while True:
        v += 1
        ticket = store.commit(key, state(v, uid), v - 1, Idempotency(f"{{key}}@{{v}}", "fp"))
        ticket.result()
        say(key, v)  # acknowledged: on disk

for k in "abcd":
    threading.Thread(target=run, args=(k,), daemon=True).start()
time.sleep(60)
"""


@pytest.mark.parametrize("interval", [3600.0, 0.005], ids=["log-only", "checkpointing"])
def test_strict_loses_nothing_acknowledged_on_sigkill(
    tmp_path: Path, interval: float, opened: list[LocalStore]
) -> None:
    """Four threads commit in a process that is killed with SIGKILL while they do (with
    checkpoints every few ms in the second run, so the kill lands around them too); every
    version acknowledged before the kill is there after a restart, with its numbers and keys."""
    script = CHILD.format(
        tests=str(Path(__file__).parent), path=str(tmp_path), durability="strict", interval=interval
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked: dict[str, int] = {}
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 60
        while sum(acked.values()) < 400 and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, "the child died"
            key, version = line.split()
            acked[key] = max(acked.get(key, 0), int(version))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert len(acked) == 4, acked

    store = open_store(opened, tmp_path, "strict")
    assert not store.recovery["errors"], store.recovery
    assert (store.recovery["snapshot"] is not None) == (interval < 1)  # checkpoints were taken
    for key, last in acked.items():
        now = store.read(key)
        assert now.version >= last  # (versions after `last` were committed, maybe acknowledged)
        assert same(now, state(now.version, "u" + key))
        for v in range(2, last + 1):
            assert store.applied(key, f"{key}@{v}") == Applied(v, "fp")


def test_interval_loses_at_most_what_came_after_the_last_snapshot(
    tmp_path: Path, opened: list[LocalStore]
) -> None:
    store = open_store(opened, tmp_path, "interval", snapshot_interval=0.02)
    wait(store.create("a", record("ua"), state(1, "ua")))
    advance(store, "a", "ua", 5)
    until(lambda: store._changes_saved == store._changes)  # the snapshot thread saved version 5
    store._stop.set()  # stops it from taking another: what follows is only in memory
    assert store._snapshotter is not None
    store._snapshotter.join()
    advance(store, "a", "ua", 9)
    store._abandon()  # the crash
    store = open_store(opened, tmp_path, "interval")
    assert same(store.read("a"), state(5, "ua"))
    assert not store.recovery["errors"]


def test_a_snapshot_cut_short_by_a_crash_is_ignored(
    tmp_path: Path, opened: list[LocalStore]
) -> None:
    store = open_store(opened, tmp_path, "interval")
    wait(store.create("a", record("ua"), state(1, "ua")))
    store.close()
    (tmp_path / "snapshot.tmp").write_bytes((tmp_path / "snapshot").read_bytes()[:40])
    store = open_store(opened, tmp_path, "interval")
    assert same(store.read("a"), state(1, "ua")) and not store.recovery["errors"]
    assert not (tmp_path / "snapshot.tmp").exists()


# ---- corrupt and torn files


def snapshot_of_one_session(tmp_path: Path) -> bytes:
    store = LocalStore(tmp_path, "interval", 3600.0)
    wait(store.create("a", record("ua"), state(1, "ua")))
    store.commit("a", state(2, "ua"), 1, Idempotency("k", "fp"))
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "lock", "snapshot"]
    return (tmp_path / "snapshot").read_bytes()


def test_every_corrupted_byte_of_a_snapshot_is_caught(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever byte is altered (or wherever the file is cut), the snapshot is moved aside with
    an ERROR, and the store starts empty: never with numbers that were not written."""
    good = snapshot_of_one_session(tmp_path)
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # a thousand opens: spare the disk
    cases = [good[:i] + bytes([good[i] ^ 0x5A]) + good[i + 1 :] for i in range(len(good))]
    ends, offset = [], 0
    while offset < len(good):
        offset = unframe(good, offset)[1]
        ends.append(offset)
    cases += [good[:cut] for cut in sorted({*range(0, len(good), 7), *ends[:-1]})]
    for i, bad in enumerate(cases):
        (tmp_path / "snapshot").write_bytes(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="normserve.store"):
            store = LocalStore(tmp_path, "interval", 3600.0)
        try:
            assert store.keys() == [], i
            assert store.recovery["snapshot"] is None
            assert any(
                r.levelno == logging.ERROR and "is corrupt" in r.getMessage()
                for r in caplog.records
            ), i
            moved = store.recovery["moved_aside"]
            assert len(moved) == 1 and moved[0].startswith("snapshot.corrupt-"), moved
            assert (tmp_path / moved[0]).read_bytes() == bad  # kept for a person to look at
        finally:
            store._abandon()
        for p in tmp_path.iterdir():
            if p.name != "lock":
                p.unlink()


def test_a_corrupt_snapshot_falls_back_to_the_previous_one_and_the_log(
    tmp_path: Path, opened: list[LocalStore], caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(opened, tmp_path, "strict")
    wait(store.create("a", record("ua"), state(1, "ua")))
    advance(store, "a", "ua", 3)
    store._checkpoint()  # becomes snapshot.prev
    advance(store, "a", "ua", 6)
    store._checkpoint()
    advance(store, "a", "ua", 8)
    store._abandon()
    data = bytearray((tmp_path / "snapshot").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "snapshot").write_bytes(data)

    with caplog.at_level(logging.WARNING, logger="normserve.store"):
        store = open_store(opened, tmp_path, "strict")
    assert store.recovery["snapshot"] == "snapshot.prev"
    assert same(store.read("a"), state(8, "ua"))  # nothing lost: the log after prev was kept
    assert store.applied("a", "a@5") == Applied(5, "fp")
    assert [r.levelno for r in caplog.records].count(logging.ERROR) == 2
    assert any(n.startswith("snapshot.corrupt-") for n in os.listdir(tmp_path))


def log_of_ten_versions(tmp_path: Path) -> Path:
    store = LocalStore(tmp_path, "strict", 3600.0)
    wait(store.create("a", record("ua"), state(1, "ua")))  # (one batch each)
    advance(store, "a", "ua", 10)
    store._abandon()
    (segment,) = tmp_path.glob("wal.*")
    return segment


def test_a_torn_log_tail_is_truncated_and_the_rest_replayed(
    tmp_path: Path, opened: list[LocalStore], caplog: pytest.LogCaptureFixture
) -> None:
    segment = log_of_ten_versions(tmp_path)
    data = segment.read_bytes()
    segment.write_bytes(data[:-100])  # the last record (version 10), cut short
    with caplog.at_level(logging.WARNING, logger="normserve.store"):
        store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(9, "ua"))
    size_of_last = len(data) - data.rindex(b"NSv1")
    assert store.recovery["bytes_dropped"] == size_of_last - 100
    assert store.recovery["log_records_replayed"] == 9 and not store.recovery["errors"]
    warning, unclean = caplog.records  # what the crash tore, then that there was one
    assert "did not shut down cleanly" in unclean.getMessage()
    assert warning.levelno == logging.WARNING
    assert f"torn tail of {size_of_last - 100} bytes" in warning.getMessage()
    # what came back is kept, and the store goes on from it
    advance(store, "a", "ua", 11)
    store._abandon()
    store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(11, "ua"))


@pytest.mark.parametrize("tail", [b"\0" * 4096, b"NSv1\x40\0\0\0garbage"], ids=["zeros", "header"])
def test_torn_tails_of_other_shapes(tmp_path: Path, opened: list[LocalStore], tail: bytes) -> None:
    segment = log_of_ten_versions(tmp_path)
    with open(segment, "ab") as f:
        f.write(tail)
    store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(10, "ua"))
    assert store.recovery["bytes_dropped"] == len(tail) and not store.recovery["errors"]


def test_a_corrupt_record_in_the_middle_of_the_log_stops_replay_there(
    tmp_path: Path, opened: list[LocalStore], caplog: pytest.LogCaptureFixture
) -> None:
    segment = log_of_ten_versions(tmp_path)
    data = bytearray(segment.read_bytes())
    starts = [i for i in range(len(data)) if data.startswith(b"NSv1", i)]
    assert len(starts) == 10  # the create (version 1) and nine commits
    data[starts[5] + 30] ^= 0x10  # inside the record of version 6
    segment.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="normserve.store"):
        store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(5, "ua"))  # the prefix it can prove, no further
    assert store.applied("a", "a@6") is None
    (moved,) = store.recovery["moved_aside"]
    assert moved.startswith(segment.name + ".corrupt-")
    assert (tmp_path / moved).read_bytes() == bytes(data)
    assert any(
        r.levelno == logging.ERROR and "replay stopped" in r.getMessage() for r in caplog.records
    )
    advance(store, "a", "ua", 7)  # and it goes on from there, durably
    store._abandon()
    store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(7, "ua")) and not store.recovery["errors"]


def test_a_missing_log_segment_is_a_gap_not_a_silent_loss(
    tmp_path: Path, opened: list[LocalStore], caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(opened, tmp_path, "strict")
    wait(store.create("a", record("ua"), state(1, "ua")))
    advance(store, "a", "ua", 3)
    store._abandon()
    store = open_store(opened, tmp_path, "strict")  # checkpoints at 3, logs what follows
    advance(store, "a", "ua", 5)
    store._abandon()
    store = open_store(opened, tmp_path, "strict")  # checkpoints at 5
    advance(store, "a", "ua", 7)
    store._abandon()
    (tmp_path / "snapshot").unlink()  # as if deleted by hand: prev (at 3) + log from 4 needed
    segments = sorted(tmp_path.glob("wal.*"))
    segments[0].unlink()  # ... and the log holding 4 and 5 is gone too
    with caplog.at_level(logging.WARNING, logger="normserve.store"):
        store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(3, "ua"))  # not 7 with 4 and 5 missing: never a mix
    assert any("missing" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def rotate(store: LocalStore) -> None:
    """Starts a new log segment, as a checkpoint does, without the snapshot."""
    r = _Rotate()
    with store._cond:
        store._queue.append(r)
        store._cond.notify()
    r.future.result(timeout=10)


@pytest.mark.parametrize("damage", ["missing", "cut"])
def test_damage_to_a_log_segment_before_the_last_stops_replay_there(
    tmp_path: Path, opened: list[LocalStore], caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """Only the last segment can have a torn tail; a hole further back is corruption, and
    nothing after it is replayed (the versions after it would skip the ones it held)."""
    store = open_store(opened, tmp_path, "strict")
    wait(store.create("a", record("ua"), state(1, "ua")))
    store._checkpoint()
    for last in (4, 7, 10):  # segments 2, 3, 4
        advance(store, "a", "ua", last)
        rotate(store)
    store._abandon()
    middle = tmp_path / "wal.00000003"
    if damage == "missing":
        middle.unlink()
    else:
        middle.write_bytes(middle.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="normserve.store"):
        store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(4 if damage == "missing" else 6, "ua"))
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING]
    assert len(store.recovery["moved_aside"]) == (2 if damage == "missing" else 3)  # + wal.5


def test_a_change_that_cannot_be_encoded_fails_alone(
    tmp_path: Path, opened: list[LocalStore]
) -> None:
    store = open_store(opened, tmp_path, "strict")
    wait(store.create("a", record("ua"), state(1, "ua")))
    odd = dataclasses.replace(state(2, "ua"), running_mean=torch.zeros(C, dtype=torch.bfloat16))
    with pytest.raises(TypeError):
        wait(store.commit("a", odd, 1))  # (numpy has no bfloat16)
    wait(store.commit("a", state(3, "ua"), 2))  # the store goes on
    store._abandon()
    store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(3, "ua")) and not store.recovery["errors"]


# ---- the directory lock


def test_one_process_per_directory(tmp_path: Path, opened: list[LocalStore]) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from normserve.server.service.stores._local import LocalStore\n"
            f"s = LocalStore({str(tmp_path)!r}, 'strict', 3600.0)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        with pytest.raises(
            ValueError,
            match=rf"another normserve uses --state-dir {tmp_path} \(process {holder.pid}\)",
        ):
            LocalStore(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    store = open_store(opened, tmp_path, "interval")  # the kernel let go of a dead holder's lock
    with pytest.raises(ValueError, match="another normserve"):
        LocalStore(tmp_path)  # (the same process counts too)
    store.close()
    open_store(opened, tmp_path, "interval")


# ---- group commit


def test_concurrent_commits_share_fsyncs(
    tmp_path: Path, opened: list[LocalStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fdatasync
    syncs = 0

    def slow_sync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        time.sleep(0.002)  # a disk that takes 2 ms per flush
        real(fd)

    store = open_store(opened, tmp_path, "strict")
    monkeypatch.setattr(os, "fdatasync", slow_sync)
    keys = [f"s{i}" for i in range(16)]
    for k in keys:
        wait(store.create(k, record("u" + k), state(1, "u" + k)))
    before = store.stats["log_syncs"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: advance(store, k, "u" + k, 21), keys))
    records, fsyncs = 16 * 20, store.stats["log_syncs"] - before
    assert syncs >= fsyncs  # every batch was flushed, through os.fdatasync
    assert fsyncs <= records / 4, f"{records} commits took {fsyncs} fsyncs"
    store._abandon()
    shutil.copytree(tmp_path, tmp_path / "torn")
    store = open_store(opened, tmp_path, "strict")
    assert all(same(store.read(k), state(21, "u" + k)) for k in keys)

    # a batch is one frame: torn by a crash, none of its records come back, and no other is lost
    (segment,) = (tmp_path / "torn").glob("wal.*")
    data = segment.read_bytes()
    last = data.rindex(b"NSv1")
    in_last_batch = int.from_bytes(data[last + 12 : last + 16], "little")
    segment.write_bytes(data[:-7])
    store = open_store(opened, tmp_path / "torn", "strict")
    assert store.recovery["bytes_dropped"] == len(data) - last - 7
    assert not store.recovery["errors"]
    versions = [store.read(k).version for k in keys]
    assert sum(21 - v for v in versions) == in_last_batch and set(versions) <= {20, 21}
    assert all(same(store.read(k), state(v, "u" + k)) for k, v in zip(keys, versions, strict=True))


def test_a_change_is_acknowledged_only_once_fsynced(
    tmp_path: Path, opened: list[LocalStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    real, flushing = os.fdatasync, threading.Event()
    store = open_store(opened, tmp_path, "strict")
    wait(store.create("a", record("ua"), state(1, "ua")))
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushing.wait(10), real(fd)))
    ticket = store.commit("a", state(2, "ua"), 1)
    assert ticket is not None
    time.sleep(0.1)
    assert not ticket.done()  # the disk has not said yes yet
    flushing.set()
    ticket.result(timeout=5)


def test_a_batch_is_all_or_nothing(
    tmp_path: Path, opened: list[LocalStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The changes one fsync makes durable are one frame: damage anywhere in the last one is a
    torn write (a WARNING), and none of its changes come back."""
    real, syncing, flushing = os.fdatasync, threading.Event(), threading.Event()
    store = open_store(opened, tmp_path, "strict")
    for k in "abcd":
        wait(store.create(k, record("u" + k), state(1, "u" + k)))

    def held(fd: int) -> None:
        syncing.set()
        flushing.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    first = store.commit("a", state(2, "ua"), 1)
    assert syncing.wait(10)  # the writer waits in its fsync ...
    rest = [store.commit(k, state(2, "u" + k), 1) for k in "bcd"]  # ... while these queue up
    flushing.set()
    for ticket in (first, *rest):
        wait(ticket)
    store._abandon()
    (segment,) = tmp_path.glob("wal.*")
    data = bytearray(segment.read_bytes())
    last = data.rindex(b"NSv1")
    assert int.from_bytes(data[last + 12 : last + 16], "little") == 3  # b, c and d
    data[last + (len(data) - last) // 2] ^= 0xFF  # the middle of the batch: c's record
    segment.write_bytes(data)
    store = open_store(opened, tmp_path, "strict")
    assert [store.read(k).version for k in "abcd"] == [2, 1, 1, 1]
    assert store.recovery["bytes_dropped"] == len(data) - last
    assert not store.recovery["errors"]


def test_close_waits_for_a_change_in_progress(tmp_path: Path, opened: list[LocalStore]) -> None:
    store = open_store(opened, tmp_path, "strict")
    wait(store.create("a", record("ua"), state(1, "ua")))
    tickets: list[Ticket] = []
    with store._lock:  # the commit below is admitted, and waits for the store lock
        committing = threading.Thread(
            target=lambda: tickets.append(store.commit("a", state(2, "ua"), 1))
        )
        committing.start()
        until(lambda: store._inflight == 1)
        closing = threading.Thread(target=store.close)
        closing.start()
        until(lambda: store._closed)
        time.sleep(0.05)  # (close would go on here if it did not wait)
    committing.join(5)
    closing.join(5)
    assert not closing.is_alive()
    wait(tickets[0])  # written before the log writer stopped
    store = open_store(opened, tmp_path, "strict")
    assert same(store.read("a"), state(2, "ua"))


def test_a_failing_disk_stops_changes_and_acknowledges_none(
    tmp_path: Path, opened: list[LocalStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(opened, tmp_path, "strict")
    wait(store.create("a", record("ua"), state(1, "ua")))
    advance(store, "a", "ua", 3)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    ticket = store.commit("a", state(4, "ua"), 3)
    assert ticket is not None
    with pytest.raises(StoreUnavailable, match="cannot be written"):
        ticket.result(timeout=5)
    assert isinstance(store.failed, OSError)
    with pytest.raises(StoreUnavailable, match="restart the server"):
        store.commit("a", state(5, "ua"), 4)
    store.close()  # writes no snapshot of what was never acknowledged
    monkeypatch.undo()
    store = open_store(opened, tmp_path, "strict")
    assert store.read("a").version in (3, 4)  # 4 reached the file, or not: it was not acked
    assert same(store.read("a"), state(store.read("a").version, "ua"))


def test_a_start_after_a_crash_says_so_and_one_after_a_clean_stop_does_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalStore(tmp_path, "interval", 60.0)
    store.create("a", record("ua"), state(1, "ua"))
    store.close()
    with caplog.at_level(logging.WARNING, logger="normserve.store"):
        store = LocalStore(tmp_path, "interval", 60.0)
    assert store.recovery["clean_shutdown"] and not caplog.records
    store.commit("a", state(2, "ua"), 1)  # acknowledged after the last snapshot
    store._abandon()  # as SIGKILL would leave it
    with caplog.at_level(logging.WARNING, logger="normserve.store"):
        store = LocalStore(tmp_path, "interval", 60.0)
    assert not store.recovery["clean_shutdown"]
    assert any("did not shut down cleanly" in r.getMessage() for r in caplog.records)
    assert store.read("a").version == 1  # interval mode: the update after the snapshot is lost
    store.close()
