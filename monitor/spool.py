"""The audit trail's on-disk spool: records Redis could not take, kept in order until it can.

One append-only JSON Lines file (`audit.jsonl`) and a cursor file (`audit.cursor`, the byte offset of
the first record not yet in Redis). Every append is fsync'd before it returns, so a record the store
accepted survives a crash. Replay walks from the cursor and advances it (atomically, by rename) after
each record Redis took; when it reaches the end, the cursor is reset *before* the file is truncated, so
a crash in between replays the file again rather than skipping records. Redis writes are idempotent by
request id, so a replay repeated after a crash duplicates nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


class Spool:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / "audit.jsonl"
        self.cursor_file = folder / "audit.cursor"
        self._lock = threading.Lock()  # appends come from the writer thread and, on overflow, the loop
        self.corrupt = 0  # undecodable lines skipped (a torn write from a crash)
        self.high_water = 0  # most bytes ever waiting for replay (for /metrics and the fault benchmark)
        self._end_torn_line()

    # ---- writing ------------------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        """Append one record durably (fsync). Raises OSError when the disk cannot take it."""
        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            with _open(self.file, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            self.high_water = max(self.high_water, size - self._cursor())

    def probe(self) -> None:
        """Check that a record could be appended now (a small file written, fsync'd and removed in the
        spool folder); raises OSError when not (disk full, not a folder, read-only)."""
        probe = self.file.with_name(".probe")
        with _open(probe, "wb") as f:
            f.write(b"probe\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()

    # ---- replay -------------------------------------------------------------------------------------
    def pending(self) -> bool:
        return self.pending_bytes() > 0

    def pending_bytes(self) -> int:
        """Bytes of records not yet replayed into Redis (raises OSError when the spool cannot be read)."""
        with self._lock:
            return max(0, self._size() - self._cursor())

    def replay(self, write: Callable[[list[dict[str, Any]]], None], batch: int = 64) -> int:
        """Feed spooled records to `write`, in order, `batch` lines at a time; returns how many were
        written. An exception from `write` stops the replay with the cursor before the failed batch (it
        is retried whole next time: `write` must be idempotent)."""
        done = 0
        while True:
            with self._lock:
                start = self._cursor()
                lines = self._read_lines(start, batch)
                if not lines:
                    self._reset_if_drained()
                    return done
            offset = start + sum(len(raw) for raw in lines)
            records = [r for r in (self._decode(raw) for raw in lines) if r is not None]
            if records:
                write(records)
                done += len(records)
            self._save_cursor(offset)

    # ---- internals ----------------------------------------------------------------------------------
    def _size(self) -> int:
        try:
            return self.file.stat().st_size
        except FileNotFoundError:
            return 0

    def _cursor(self) -> int:
        try:
            cursor = int(self.cursor_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0
        return cursor if cursor <= self._size() else 0  # never resume mid-line: replay all (idempotent)

    def _save_cursor(self, offset: int) -> None:
        tmp = self.cursor_file.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(str(offset))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.cursor_file)

    def _read_lines(self, start: int, limit: int) -> list[bytes]:
        if self._size() <= start:
            return []
        out: list[bytes] = []
        with self.file.open("rb") as f:
            f.seek(start)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # not fully written yet
                out.append(raw)
                if len(out) >= limit:
                    break
        return out

    def _decode(self, raw: bytes) -> dict[str, Any] | None:
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            self.corrupt += 1
            log.error("audit spool: skipped an unreadable line in %s", self.file)
            return None
        return rec

    def _reset_if_drained(self) -> None:
        """Called with the lock held: everything was replayed, start the file afresh."""
        if self._size() == 0 or self._cursor() < self._size():
            return
        self._save_cursor(0)  # first: a crash before the truncation only means a (harmless) re-replay
        with self.file.open("r+b") as f:
            f.truncate(0)
            os.fsync(f.fileno())

    def _end_torn_line(self) -> None:
        """A crash mid-append can leave a partial last line: terminate it so later records stay whole."""
        size = self._size()
        if size == 0:
            return
        with self.file.open("rb") as f:
            f.seek(size - 1)
            last = f.read(1)
        if last != b"\n":
            with self.file.open("ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())


def _open(path: Path, mode: str) -> IO[bytes]:
    """Open for writing; a spool folder that was removed (a cleaned data dir) is made again."""
    try:
        return path.open(mode)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open(mode)
