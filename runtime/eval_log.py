"""``prune-eval``'s ``results.jsonl``: an append-only log of answers that survives kills and full disks, and is
never a symbolic link, a FIFO or a folder (see ``ResultLog``)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from vlmprune.errors import VlmpruneError
from vlmprune.safe_read import kind_of, loads_bounded

FORMAT = 1


class ResultLog:
    """Append-only JSON lines: a header with the settings answers depend on, then one line per answer.

    Each line is written whole, flushed and fsynced before the next answer starts, so a crash loses at most the
    answer being computed. A write that fails part-way (a full disk) is cut back to the last whole line before the
    error is raised. A torn last line (no newline: the process died mid-write) is cut off before appending; any
    other unreadable line is ignored and counted. A lock keeps two runs from writing one file. The file is opened
    once, without following a symbolic link and without blocking, and must be a regular file."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = settings
        self.records: dict[tuple, dict] = {}
        self.ignored = 0
        self.repaired = False
        header = None
        good_end = 0
        self.fd = _open_results(path)
        self._lock()
        raw = _read_all(self.fd)
        if raw:
            pos = 0
            while pos < len(raw):
                end = raw.find(b"\n", pos)
                if end < 0:  # torn tail
                    self.repaired = True
                    break
                line = raw[pos:end]
                pos = good_end = end + 1
                try:
                    obj = loads_bounded(line)  # a line nested too deep is unreadable, like any malformed one
                except (ValueError, UnicodeDecodeError):
                    self.ignored += 1
                    continue
                if header is None:
                    if not (isinstance(obj, dict) and obj.get("prune_eval_results") == FORMAT):
                        raise VlmpruneError(f"{path} exists and is not a prune-eval results file",
                                            "pass another --out folder")
                    header = obj
                    try:
                        self._check(header.get("settings", {}))
                    except BaseException:
                        os.close(self.fd)
                        raise
                    continue
                if isinstance(obj, dict) and all(k in obj for k in ("bundle_id", "bucket", "qid", "item")):
                    self.records[(obj["bundle_id"], obj["bucket"], obj["qid"], obj["item"])] = obj
                else:
                    self.ignored += 1
        if header is None and raw and not (b"\n" not in raw and raw.startswith(b'{"prune_eval_results"')):
            # only an empty file or our own torn header may be started afresh: anything else is not ours
            os.close(self.fd)
            raise VlmpruneError(f"{path} exists and is not a prune-eval results file", "pass another --out folder")
        if self.repaired or header is None:
            os.ftruncate(self.fd, good_end if header is not None else 0)
        if header is None:
            self._write({"prune_eval_results": FORMAT, "settings": settings})

    def _check(self, stored: dict) -> None:
        diff = [f"{k.replace('_', '-')} {stored.get(k)!r} (this run: {v!r})" for k, v in self.settings.items()
                if stored.get(k) != v]
        if diff:
            raise VlmpruneError(f"{self.path} holds answers made with other settings: {', '.join(diff)}",
                                "rerun with those settings to resume, or pass another --out folder")

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise VlmpruneError(f"another prune-eval is writing {self.path}",
                                "wait for it to finish or pass another --out folder") from None

    def _write(self, obj: dict) -> None:
        data = memoryview((json.dumps(obj, separators=(",", ":")) + "\n").encode())
        end = os.fstat(self.fd).st_size
        try:
            while data:  # os.write may write part of it (a full disk writes what fits, then fails)
                data = data[os.write(self.fd, data):]
            os.fsync(self.fd)
        except BaseException:
            try:  # cut the torn line off: the file ends with a whole answer, as the disk-full message says
                os.ftruncate(self.fd, end)
            except OSError:
                pass
            raise

    def __contains__(self, k) -> bool:
        return k in self.records

    def append(self, record: dict) -> None:
        self._write(record)
        self.records[(record["bundle_id"], record["bucket"], record["qid"], record["item"])] = record

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_results(path: Path) -> int:
    """``results.jsonl`` for reading and appending: never through a symbolic link (O_NOFOLLOW), never blocking on a
    FIFO (O_NONBLOCK), and refused unless it is a regular file."""
    flags = (os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if os.path.islink(path):
            raise VlmpruneError(f"{path} is a symbolic link; prune-eval writes only its own regular file there",
                                "remove it, or pass another --out folder") from None
        if os.path.isdir(path):
            raise VlmpruneError(f"{path} is a folder, not prune-eval's results file",
                                "remove it, or pass another --out folder") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise VlmpruneError(f"{path} is {kind_of(st.st_mode)}, not prune-eval's results file",
                            "remove it, or pass another --out folder")
    return fd


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while True:
        block = os.pread(fd, 1 << 20, offset)
        if not block:
            return b"".join(chunks)
        chunks.append(block)
        offset += len(block)
