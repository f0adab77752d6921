"""The local durable store: sessions in memory, kept in a state directory that outlives the process.

What a crash (SIGKILL, power loss) can lose:

- ``interval`` (the default): the changes made since the last snapshot, so at most the last
  ``snapshot_interval`` seconds (plus the time one snapshot takes to write). ``close`` (the
  SIGTERM path) writes a last snapshot: a clean stop loses nothing.
- ``strict``: nothing that was acknowledged. Every change goes to a write-ahead log, and its
  ticket completes only once the log is fsynced; concurrent changes share one fsync (group
  commit: everything queued while one fsync runs is written by the next).

The directory (one server at a time: ``lock`` is held with ``flock`` while the store is open)::

    lock                 held by the open store (the kernel releases it when the process dies)
    snapshot             every session, as of log sequence number (LSN) ``lsn``
    snapshot.prev        the snapshot before it (the fallback if ``snapshot`` is corrupt)
    wal.00000042         log segments (strict): the changes after a snapshot, in commit order
    *.corrupt-<time>     files that failed their checksums, moved aside for a person to look at

Every file is a sequence of frames (``_codec.frame``: magic, length, CRC-32), never pickle.

A snapshot is a header frame (its LSN, and the first log segment it does not cover), one frame per
session (the record, the state, the remembered idempotency keys) and an end frame with the session
count: one without its end frame is incomplete. It is written to ``snapshot.tmp``, fsynced,
renamed over ``snapshot`` (the old one kept as ``snapshot.prev`` through a hard link) and the
directory fsynced.

A log record holds its LSN and the change (create: record and state; commit: state and
idempotency key; drop: the key alone); every change carries the whole state, so replay never adds
numbers up, it takes the last state. Each batch (the records one fsync makes durable) is one
frame: a crash can tear only the last one, never acknowledged, so a bad frame followed by a good
one is corruption, not a crash.

Checkpoints (strict): the snapshot thread asks the log writer to start a new segment (between
two batches), then copies the sessions under the store lock: every change before the new segment
has an LSN at most the copy's, so the segments before it are covered by the snapshot once that
is renamed into place. They are deleted one checkpoint later (the previous snapshot and the log
after it are a complete fallback). Replay skips records at or below the snapshot's LSN, so a crash
between a snapshot and the deletion of the old segments is harmless, and the writer never waits
for a snapshot to be written.

Recovery (on open): the snapshot (or, if it is corrupt, the previous one), then the log segments
in order. A torn tail of the last segment (a write the crash cut short, never acknowledged) is
truncated with a WARNING. A corrupt snapshot or log frame, a gap in the LSNs, or a record that
contradicts the state is reported at ERROR on the ``normserve.store`` logger, the file is moved
aside, and replay stops there: the store starts from the last consistent state it can prove,
never from wrong numbers. ``LocalStore.recovery`` says what was found.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import logging
import math
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from normserve.server.service._state import SessionState
from normserve.server.service.stores._base import (
    Applied,
    Idempotency,
    KeyPolicy,
    SessionRecord,
    StoreUnavailable,
    Ticket,
    prune_keys,
)
from normserve.server.service.stores._codec import (
    _MAGIC,
    CorruptData,
    decode_record,
    decode_state,
    encode_record,
    encode_state,
    frame,
    unframe,
)
from normserve.server.service.stores._memory import MemoryStore

__all__ = ["LocalStore"]

log = logging.getLogger("normserve.store")

SNAPSHOT = "snapshot"
PREVIOUS = "snapshot.prev"
#: Written by a clean close: its absence at the next start means the last run ended abruptly.
CLEAN = "clean"
LOCK = "lock"
_SEGMENT = re.compile(r"wal\.(\d+)")
_FORMAT = "normserve-snapshot"
_FORMAT_VERSION = 1
_DURABILITY = ("interval", "strict")
_STATS = (
    "log_records",
    "log_syncs",
    "log_bytes",
    "snapshots",
    "snapshot_bytes",
    "snapshot_seconds",
)

Keys = dict[str, tuple[Applied, float]]


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _pack(*parts: bytes) -> bytes:
    """Several byte strings as one payload: their count, their lengths, then the bytes."""
    head = len(parts).to_bytes(4, "little")
    head += b"".join(len(p).to_bytes(4, "little") for p in parts)
    return head + b"".join(parts)


def _unpack(payload: bytes) -> list[bytes]:
    if len(payload) < 4:
        raise CorruptData("empty entry")
    count = int.from_bytes(payload[:4], "little")
    offset = 4 + 4 * count
    if offset > len(payload):
        raise CorruptData(f"entry of {len(payload)} bytes cannot hold {count} parts")
    lengths = [int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "little") for i in range(count)]
    if offset + sum(lengths) != len(payload):
        raise CorruptData(f"entry of {len(payload)} bytes does not hold its {count} parts")
    parts = []
    for n in lengths:
        parts.append(payload[offset : offset + n])
        offset += n
    return parts


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[bytes]:
    """The file's bytes, mapped rather than read (a snapshot may be large). Slices are copies."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            yield cast(bytes, m)  # unframe needs len, unpack_from and slicing: mmap has them


def _segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir():
        m = _SEGMENT.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def _valid_frame_after(data: bytes, offset: int) -> bool:
    """Whether a frame that passes its checksum starts anywhere after ``offset``: if one does,
    the bad frame at ``offset`` is corruption in the middle, not the tail a crash cut short."""
    at = data.find(_MAGIC, offset + 1)
    while at >= 0:
        with contextlib.suppress(CorruptData):
            unframe(data, at)
            return True
        at = data.find(_MAGIC, at + 1)
    return False


@dataclass(slots=True, eq=False)
class _Change:
    """One log record."""

    op: str  # create | commit | drop | noop (an LSN whose change could not be written)
    key: str
    lsn: int = 0
    record: SessionRecord | None = None
    state: SessionState | None = None
    idempotency_key: str | None = None
    applied: Applied | None = None
    at: float = 0.0
    future: concurrent.futures.Future[None] | None = None

    def encode(self) -> bytes:
        meta: dict[str, Any] = {"lsn": self.lsn, "op": self.op, "key": self.key}
        if self.idempotency_key is not None and self.applied is not None:
            meta |= {
                "ik": self.idempotency_key,
                "v": self.applied.version,
                "fp": self.applied.fingerprint,
                "at": self.at,
            }
        parts = [_json(meta)]
        if self.record is not None:
            parts.append(encode_record(self.record))
        if self.state is not None:
            parts.append(encode_state(self.state))
        return _pack(*parts)

    @staticmethod
    def decode(payload: bytes) -> _Change:
        try:
            parts = _unpack(payload)
            meta = json.loads(parts[0])
            op, n = meta["op"], len(parts)
            if (op, n) not in (("create", 3), ("commit", 2), ("drop", 1), ("noop", 1)):
                raise CorruptData(f"unknown log record {op!r} of {n} parts")
            change = _Change(op, str(meta["key"]), int(meta["lsn"]))
            if op == "create":
                change.record = decode_record(parts[1])
            if op in ("create", "commit"):
                change.state = decode_state(parts[-1])
            if "ik" in meta:
                change.idempotency_key = str(meta["ik"])
                change.applied = Applied(int(meta["v"]), str(meta["fp"]))
                change.at = float(meta["at"])
            return change
        except CorruptData:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise CorruptData(f"not a log record ({err!r})") from None


@dataclass(slots=True, eq=False)
class _Rotate:
    """Asks the log writer to start a new segment; its future gets the new segment's number."""

    future: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)


@dataclass
class _Snapshot:
    lsn: int
    wal_from: int
    time: float
    records: dict[str, SessionRecord]
    states: dict[str, SessionState]
    keys: dict[str, Keys]


def _read_snapshot(path: Path) -> _Snapshot:
    """The whole snapshot, or CorruptData: nothing of a snapshot that fails anywhere is used."""
    try:
        with _mapped(path) as data:
            payload, offset = unframe(data, 0)
            head = json.loads(_unpack(payload)[0])
            if head.get("t") != "head" or head.get("format") != _FORMAT:
                raise CorruptData("not a normserve snapshot")
            if head.get("version") != _FORMAT_VERSION:
                raise CorruptData(f"snapshot format version {head.get('version')} is unknown")
            snap = _Snapshot(
                int(head["lsn"]), int(head["wal_from"]), float(head["time"]), {}, {}, {}
            )
            while True:
                if offset >= len(data):
                    raise CorruptData("no end frame: the snapshot is incomplete")
                payload, offset = unframe(data, offset)
                parts = _unpack(payload)
                meta = json.loads(parts[0])
                if meta.get("t") == "end":
                    break
                if meta.get("t") != "session" or len(parts) != 3:
                    raise CorruptData(f"unexpected entry {meta.get('t')!r}")
                key = str(meta["key"])
                if key in snap.states:
                    raise CorruptData(f"session {key!r} appears twice")
                snap.records[key] = decode_record(parts[1])
                snap.states[key] = decode_state(parts[2])
                snap.keys[key] = {
                    str(ik): (Applied(int(v), str(fp)), float(at)) for ik, v, fp, at in meta["keys"]
                }
            if int(meta["sessions"]) != len(snap.states) or int(meta["lsn"]) != snap.lsn:
                raise CorruptData(
                    f"the end frame says {meta['sessions']} sessions at LSN {meta['lsn']}, "
                    f"the snapshot holds {len(snap.states)} at LSN {snap.lsn}"
                )
            if offset != len(data):
                raise CorruptData(f"{len(data) - offset} bytes after the end frame")
            return snap
    except CorruptData:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise CorruptData(f"not a normserve snapshot ({err!r})") from None


class LocalStore(MemoryStore):
    """The memory store, kept in ``directory`` (see the module docstring). ``durability``:
    "interval" (a snapshot every ``snapshot_interval`` seconds if anything changed, and on
    ``close``) or "strict" (a write-ahead log, fsynced before a change's ticket completes; the
    snapshots become checkpoints). ValueError if another process holds the directory."""

    shared = False
    durable = True

    def __init__(
        self,
        directory: str | os.PathLike[str],
        durability: str = "interval",
        snapshot_interval: float = 5.0,
        key_policy: KeyPolicy | None = None,
    ) -> None:
        if durability not in _DURABILITY:
            raise ValueError(f"--durability: expected interval or strict, got {durability!r}")
        if not (math.isfinite(snapshot_interval) and snapshot_interval > 0):
            raise ValueError(f"--snapshot-interval: must be > 0 seconds, got {snapshot_interval}")
        super().__init__(key_policy)
        self.directory = Path(directory)
        self.durability = durability
        self.snapshot_interval = snapshot_interval
        self.strict = durability == "strict"
        #: what opening the directory found (for the server to log); see ``_recover``
        self.recovery: dict[str, Any] = {}
        #: counters: log records, batches, fsyncs and bytes; snapshots and their size and time
        self.stats: dict[str, float] = dict.fromkeys(_STATS, 0)
        self._closed = False
        self._gate = threading.Condition(threading.Lock())  # admits changes until close
        self._inflight = 0
        self._failed: BaseException | None = None
        self._lsn = 0  # the last LSN given to a change (strict) or recovered
        self._changes = 0  # changes made (under the store lock); a snapshot is due if it moved
        self._changes_saved = 0
        self._segment = 0  # the open log segment (strict), or the highest one seen
        self._log_fd = -1
        self._wal_from = 0  # the first segment the current snapshot does not cover
        self._checkpoint_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())  # guards the log queue
        self._queue: list[_Change | _Rotate] = []
        self._stopping = False
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._snapshotter: threading.Thread | None = None
        self._lock_fd = self._take_lock()
        try:
            self._recover()
            if self.strict:
                self._open_segment(self._segment + 1)
                self._writer = self._start(self._write_loop, "normserve-store-log")
            self._snapshotter = self._start(self._snapshot_loop, "normserve-store-snapshot")
        except BaseException:
            self._stop_threads()
            self._release()
            raise

    # ---- the interface: a change is admitted (or refused, changing nothing) before it is made

    def create(self, key: str, record: SessionRecord, state: SessionState) -> Ticket:
        self._enter()
        try:
            return super().create(key, record, state)
        finally:
            self._leave()

    def commit(
        self,
        key: str,
        state: SessionState,
        expected_version: int,
        idempotency: Idempotency | None = None,
    ) -> Ticket:
        self._enter()
        try:
            return super().commit(key, state, expected_version, idempotency)
        finally:
            self._leave()

    def drop(self, key: str) -> Ticket:
        self._enter()
        try:
            return super().drop(key)
        finally:
            self._leave()

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the log (the disk failed): the store accepts no more changes,
        and the server should be restarted once the disk is fixed."""
        return self._failed

    def close(self) -> None:
        """Waits for the changes in progress, stops the threads (the log writer writes what is
        queued), writes a last snapshot if anything changed, and releases the directory.
        Idempotent. Raises, having released everything, if the last snapshot cannot be written."""
        if not self._shut():
            return
        try:
            self._stop_threads()
            if self._failed is None and self._changes != self._changes_saved:
                self._checkpoint()
            if self._failed is None:
                # read by the next start: everything acknowledged is in the snapshot
                (self.directory / CLEAN).write_text(f"{os.getpid()}\n")
        except Exception:
            log.exception(
                "could not write the last snapshot to %s: the changes since the previous one "
                "are %s",
                self.directory,
                "in the log" if self.strict else "lost",
            )
            raise
        finally:
            self._release()

    def _abandon(self) -> None:
        """Closes without the last snapshot, leaving the directory as a crash after the last
        acknowledged change would (for tests)."""
        if self._shut():
            self._stop_threads()
            self._release()

    def _enter(self) -> None:
        with self._gate:
            if self._closed or self._failed is not None:
                raise self._unavailable()
            self._inflight += 1

    def _leave(self) -> None:
        with self._gate:
            self._inflight -= 1
            if self._closed and not self._inflight:
                self._gate.notify_all()

    def _shut(self) -> bool:
        """Admits no more changes and waits for those admitted; False if already closed."""
        with self._gate:
            if self._closed:
                return False
            self._closed = True
            while self._inflight:
                self._gate.wait()
            return True

    # ---- hooks (called under the store lock): the log order is the commit order

    def _created(self, key: str, record: SessionRecord, state: SessionState) -> Ticket:
        return self._log(_Change("create", key, record=record, state=state))

    def _committed(
        self, key: str, state: SessionState, idempotency_key: str | None, applied: Applied | None
    ) -> Ticket:
        change = _Change("commit", key, state=state)
        if idempotency_key is not None and applied is not None:
            seen = self._keys[key].get(idempotency_key)
            change.idempotency_key, change.applied = idempotency_key, applied
            change.at = seen[1] if seen is not None else time.time()
        return self._log(change)

    def _dropped(self, key: str) -> Ticket:
        return self._log(_Change("drop", key))

    def _log(self, change: _Change) -> Ticket:
        self._changes += 1
        if not self.strict:
            return None
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._cond:
            if self._failed is not None:  # (admitted just before the log failed)
                raise self._unavailable()
            self._lsn += 1
            change.lsn, change.future = self._lsn, future
            self._queue.append(change)
            self._cond.notify()
        return future

    def _unavailable(self) -> StoreUnavailable:
        if self._failed is not None:
            return StoreUnavailable(
                f"the state directory {self.directory} cannot be written "
                f"({self._failed}); restart the server once the disk is fixed"
            )
        return StoreUnavailable(f"the store in {self.directory} is closed")

    # ---- the log writer (strict): one thread, one fsync per batch

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                batch, self._queue = self._queue, []
                if not batch:  # stopping, and everything queued before is written
                    return
            try:
                self._write(batch)
            except BaseException as err:
                self._fail(err, batch)
                return

    def _write(self, batch: list[_Change | _Rotate]) -> None:
        payloads: list[bytes] = []
        waiting: list[concurrent.futures.Future[None]] = []
        for item in batch:
            if isinstance(item, _Rotate):
                self._flush(payloads, waiting)
                self._open_segment(self._segment + 1)
                item.future.set_result(self._segment)
                continue
            try:
                payload = item.encode()
            except Exception as err:  # this change only (a state that cannot be encoded)
                log.exception("LSN %d (%s of %r) cannot be encoded", item.lsn, item.op, item.key)
                if item.future is not None:
                    item.future.set_exception(err)
                payload = _Change("noop", item.key, item.lsn).encode()  # no gap in the LSNs
            else:
                if item.future is not None:
                    waiting.append(item.future)
            payloads.append(payload)
        self._flush(payloads, waiting)

    def _flush(self, payloads: list[bytes], waiting: list[concurrent.futures.Future[None]]) -> None:
        """Writes a batch as one frame, the unit a crash can tear (a write that was never
        acknowledged), and fsyncs it."""
        if not payloads:
            return
        data = memoryview(frame(_pack(*payloads)))
        size = len(data)
        while data:
            data = data[os.write(self._log_fd, data) :]
        getattr(os, "fdatasync", os.fsync)(self._log_fd)  # (looked up here: tests count them)
        self.stats["log_syncs"] += 1
        self.stats["log_records"] += len(payloads)
        self.stats["log_bytes"] += size
        for future in waiting:
            future.set_result(None)
        payloads.clear()
        waiting.clear()

    def _open_segment(self, number: int) -> None:
        """Starts log segment ``number``; the previous one is already fsynced (or empty)."""
        path = self.directory / f"wal.{number:08d}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        _fsync_dir(self.directory)  # the segment's name is durable before a record in it is
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._log_fd, self._segment = fd, number

    def _fail(self, err: BaseException, batch: list[_Change | _Rotate]) -> None:
        log.error(
            "the write-ahead log in %s cannot be written: %s. This store accepts no more "
            "changes; the changes not acknowledged were not made durable",
            self.directory,
            err,
            exc_info=not isinstance(err, OSError),  # (a bug, not the disk: show where)
        )
        with self._cond:
            self._failed = err
            pending, self._queue = batch + self._queue, []
        unavailable = self._unavailable()
        for item in pending:
            if item.future is not None and not item.future.done():
                item.future.set_exception(unavailable)

    # ---- snapshots

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.snapshot_interval):
            if self._changes == self._changes_saved:
                continue
            try:
                self._checkpoint()
            except Exception:
                if self._failed is not None:
                    return  # the log failed: reported once, by the writer
                log.exception(
                    "could not write a snapshot to %s (retrying in %gs)%s",
                    self.directory,
                    self.snapshot_interval,
                    "" if self.strict else ": the changes since the last one are not on disk",
                )

    def _checkpoint(self) -> None:
        """Writes a snapshot of every session and deletes the log segments it makes redundant."""
        with self._checkpoint_lock:
            if self._failed is not None:
                raise self._unavailable()
            started = time.monotonic()
            if self._writer is not None:
                rotate = _Rotate()
                with self._cond:
                    if self._failed is not None:
                        raise self._unavailable()
                    self._queue.append(rotate)
                    self._cond.notify()
                wal_from = rotate.future.result()
            else:  # no log is being written: the snapshot covers every segment there is
                wal_from = self._segment + 1
            with self._lock:  # a point where every change up to _lsn is in the log or the copy
                records, states = dict(self._records), dict(self._states)
                keys = {k: list(v.items()) for k, v in self._keys.items()}
                lsn, changes = self._lsn, self._changes
            size = self._write_snapshot(records, states, keys, lsn, wal_from)
            # the segments the previous snapshot (now snapshot.prev) needs are kept: with it,
            # they are the fallback should the new one be found corrupt
            keep_from, self._wal_from = self._wal_from, wal_from
            for number, path in _segments(self.directory):
                if number < keep_from:
                    path.unlink()
            self._changes_saved = changes
            self.stats["snapshots"] += 1
            self.stats["snapshot_bytes"] = size
            self.stats["snapshot_seconds"] = time.monotonic() - started

    def _write_snapshot(
        self,
        records: dict[str, SessionRecord],
        states: dict[str, SessionState],
        keys: dict[str, list[tuple[str, tuple[Applied, float]]]],
        lsn: int,
        wal_from: int,
    ) -> int:
        tmp = self.directory / (SNAPSHOT + ".tmp")
        try:
            with open(tmp, "wb") as f:
                head = {"t": "head", "format": _FORMAT, "version": _FORMAT_VERSION}
                head |= {"lsn": lsn, "wal_from": wal_from, "time": time.time()}
                f.write(frame(_pack(_json(head))))
                for key, state in states.items():
                    meta = {
                        "t": "session",
                        "key": key,
                        "keys": [[k, a.version, a.fingerprint, at] for k, (a, at) in keys[key]],
                    }
                    entry = _pack(_json(meta), encode_record(records[key]), encode_state(state))
                    f.write(frame(entry))
                f.write(frame(_pack(_json({"t": "end", "sessions": len(states), "lsn": lsn}))))
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        current, previous = self.directory / SNAPSHOT, self.directory / PREVIOUS
        if current.exists():  # kept as the fallback, through a link: `snapshot` never goes missing
            link = self.directory / (PREVIOUS + ".tmp")
            link.unlink(missing_ok=True)
            os.link(current, link)
            os.replace(link, previous)
        os.replace(tmp, current)
        _fsync_dir(self.directory)
        return size

    # ---- recovery

    def _recover(self) -> None:
        started = time.monotonic()
        r = self.recovery = {
            "directory": str(self.directory),
            "snapshot": None,  # the file the sessions came from (snapshot, snapshot.prev)
            "snapshot_sessions": 0,
            "log_segments": 0,
            "log_records_replayed": 0,
            "log_records_skipped": 0,  # already in the snapshot
            "log_records_orphaned": 0,  # about sessions whose creation was in a lost snapshot
            "bytes_dropped": 0,  # the torn tail of the log
            "moved_aside": [],
            "errors": [],
            "sessions": 0,
            "seconds": 0.0,
        }
        marker = self.directory / CLEAN
        clean = marker.exists()
        marker.unlink(missing_ok=True)  # until this run closes cleanly in its turn
        r["clean_shutdown"] = clean
        for leftover in (SNAPSHOT + ".tmp", PREVIOUS + ".tmp"):
            (self.directory / leftover).unlink(missing_ok=True)  # a snapshot a crash cut short
        base = self._load_snapshot()
        segments = _segments(self.directory)
        r["log_segments"] = len(segments)
        self._segment = segments[-1][0] if segments else 0
        self._lsn = base.lsn if base else 0
        self._replay(segments, base)
        for _, path in _segments(self.directory):
            if path.stat().st_size == 0:  # the log of a start that changed nothing
                path.unlink()
        now = time.time()
        for keys in self._keys.values():
            prune_keys(keys, self.key_policy, now)
        r["sessions"] = len(self._states)
        if not clean and (base is not None or segments):
            log.warning(
                "the last server on %s did not shut down cleanly (SIGKILL, a crash, power loss): "
                "what it acknowledged in strict mode is back (%d log records replayed); in "
                "interval mode, what it acknowledged after its last snapshot is lost",
                self.directory,
                r["log_records_replayed"],
            )
        if (
            r["log_records_replayed"]
            or r["bytes_dropped"]
            or r["moved_aside"]
            or r["snapshot"] == PREVIOUS
        ):
            self._checkpoint()  # start from one good snapshot that holds everything recovered
        r["seconds"] = round(time.monotonic() - started, 6)
        log.info(
            "state directory %s (%s): %d sessions; %d log records replayed%s",
            self.directory,
            self.durability,
            r["sessions"],
            r["log_records_replayed"],
            f"; {len(r['errors'])} errors (see above)" if r["errors"] else "",
        )

    def _error(self, message: str) -> None:
        log.error("%s", message)
        self.recovery["errors"].append(message)

    def _move_aside(self, path: Path) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        os.replace(path, target)
        _fsync_dir(self.directory)
        self.recovery["moved_aside"].append(target.name)
        return target.name

    def _load_snapshot(self) -> _Snapshot | None:
        for name in (SNAPSHOT, PREVIOUS):
            path = self.directory / name
            if not path.exists():
                if name == SNAPSHOT and (self.directory / PREVIOUS).exists():
                    self._error(f"{path} is missing (deleted?): trying {PREVIOUS}")
                continue
            try:  # (an OSError is no proof of corruption: it stops the start instead)
                snap = _read_snapshot(path)
            except CorruptData as err:
                moved = self._move_aside(path)
                self._error(
                    f"{path} is corrupt ({err}); moved aside to {moved}"
                    + (f", trying {PREVIOUS}" if name == SNAPSHOT else "")
                )
                continue
            if name == PREVIOUS:
                written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.time))
                self._error(
                    f"recovering from the previous snapshot ({written}) and the log after it"
                    + ("" if self.strict else ": changes made after it may be lost")
                )
            self._records, self._states, self._keys = snap.records, snap.states, snap.keys
            self._wal_from = snap.wal_from
            self.recovery["snapshot"] = name
            self.recovery["snapshot_sessions"] = len(snap.states)
            return snap
        if self.recovery["moved_aside"]:
            self._error(
                f"no good snapshot in {self.directory}: starting from the write-ahead log alone "
                "(empty if there is none); the sessions only the snapshot held are lost"
            )
        return None

    def _replay(self, segments: list[tuple[int, Path]], base: _Snapshot | None) -> None:
        r = self.recovery
        expected: int | None = None  # the LSN the next record must have
        for i, (_, path) in enumerate(segments):
            bad: tuple[int, str, bool] | None = None  # offset, why, whether a crash can explain it
            with _mapped(path) as data:
                size, offset = len(data), 0
                while offset < size:
                    try:
                        payload, end = unframe(data, offset)
                    except CorruptData as err:
                        tail = i == len(segments) - 1 and not _valid_frame_after(data, offset)
                        bad = (offset, str(err), tail)
                        break
                    try:
                        for record in _unpack(payload):
                            change = _Change.decode(record)
                            self._replay_one(change, expected, base)
                            expected = change.lsn + 1
                            self._lsn = max(self._lsn, change.lsn)
                    except CorruptData as err:
                        bad = (offset, f"batch at byte {offset}: {err}", False)
                        break
                    offset = end
            if bad is None:
                continue
            offset, why, tail = bad
            if tail:
                os.truncate(path, offset)
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                r["bytes_dropped"] += size - offset
                log.warning(
                    "%s: dropped a torn tail of %d bytes (%s), a write the crash cut short "
                    "(never acknowledged); %d log records replayed",
                    path,
                    size - offset,
                    why,
                    r["log_records_replayed"],
                )
            else:
                moved = [self._move_aside(p) for _, p in segments[i:]]
                self._error(
                    f"{path} is corrupt ({why}): replay stopped there, at LSN {self._lsn}; "
                    f"moved aside: {', '.join(moved)}. Changes logged after that point are lost"
                )
            break
        if r["log_records_orphaned"]:
            self._error(
                f"{r['log_records_orphaned']} log records are about sessions whose creation "
                "was only in the lost snapshot: those sessions are lost"
            )

    def _replay_one(self, change: _Change, expected: int | None, base: _Snapshot | None) -> None:
        r = self.recovery
        if expected is None and base is not None and change.lsn > base.lsn + 1:
            raise CorruptData(
                f"the log starts at LSN {change.lsn}, the snapshot ends at {base.lsn}: the "
                "records between are missing"
            )
        if expected is not None and change.lsn != expected:
            raise CorruptData(f"LSN {change.lsn} where {expected} was due")
        if base is not None and change.lsn <= base.lsn:
            r["log_records_skipped"] += 1
        elif self._apply(change, orphans=base is None):
            r["log_records_replayed"] += 1
        else:
            r["log_records_orphaned"] += 1

    def _apply(self, change: _Change, orphans: bool) -> bool:
        """Replays one change (checking it could have happened: CorruptData if not); False: it
        is about a session unknown because the snapshot was lost (``orphans``)."""
        key, known = change.key, change.key in self._states
        if change.op == "noop":
            return True
        if change.op == "create":
            if known:
                raise CorruptData(f"LSN {change.lsn} creates {key!r}, which exists")
            assert change.record is not None and change.state is not None
            self._records[key], self._states[key], self._keys[key] = change.record, change.state, {}
            return True
        if not known:
            if orphans:
                return False
            raise CorruptData(f"LSN {change.lsn} changes {key!r}, which does not exist")
        if change.op == "drop":
            del self._records[key], self._states[key], self._keys[key]
            return True
        assert change.state is not None
        self._states[key] = change.state
        if change.idempotency_key is not None and change.applied is not None:
            keys = self._keys[key]
            keys[change.idempotency_key] = (change.applied, change.at)
            if len(keys) > self.key_policy.max_keys:
                prune_keys(keys, self.key_policy, change.at)
        return True

    # ---- the directory lock and the threads

    def _take_lock(self) -> int:
        created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_dir(self.directory.resolve().parent)
        path = self.directory / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise ValueError(
                f"another normserve uses --state-dir {self.directory}"
                + (f" (process {holder})" if holder else "")
                + "; stop it, or give this server its own directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _start(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def _stop_threads(self) -> None:
        """The snapshot thread first (a checkpoint may wait on the writer), then the writer,
        which writes everything queued before it stops."""
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
            self._snapshotter = None
        if self._writer is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._writer.join()
            self._writer = None

    def _release(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
