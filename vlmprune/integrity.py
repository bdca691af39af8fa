"""Integrity records: what a writer put in a folder, with sizes and digests, and how a reader checks it.

Every writer of a bundle folder (``prune-export`` for the bundle itself; ``prune-build`` and ``prune-calibrate``
for their own subfolders) ends by writing ``record.json`` over exactly the files it wrote. A reader opens only files
named in a verified record, each confined to the folder (relative path, no ``..``, no symlink leading out, a regular
file: never a device or a FIFO).

Two ways to check, because a 7B bundle holds tens of GB:
- ``quick`` (the default when a bundle is opened): every file's size; a full sha256 of small files and of every
  structure file (``.json``, ``.onnx`` graphs, tokenizers), whose every byte matters; and for large binary files
  (weights, embedding tables, engines) a *sample digest*: sha256 over the size and ``SAMPLE_BLOCKS`` blocks of
  ``SAMPLE_BLOCK`` bytes at fixed places (head, tail, evenly spaced), about 1 MiB per file. It catches a truncated
  or extended file, a replaced file, and any change inside a sampled block; it does not catch a change confined
  to unsampled bytes of a large file of unchanged size (bit rot, a deliberate edit).
- ``full``: sha256 of every byte of every file (``prune-run --verify full``, ``prune-verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import VlmpruneError

RECORD = "record.json"
RECORD_VERSION = 1
MODES = ("quick", "full")
SAMPLE_MIN_BYTES = 8 << 20  # files at least this large get a sample digest
SAMPLE_BLOCK = 64 << 10
SAMPLE_BLOCKS = 16  # evenly spaced, plus the head and the tail
FULL_SUFFIXES = (".json", ".onnx", ".txt", ".model", ".jinja")  # always hashed whole: structure, not bulk data
MAX_RECORD_BYTES = 16 << 20


def check_relpath(rel: Any, where: str) -> str:
    """The one lexical rule for every path a bundle names: a relative POSIX path inside the folder."""
    if not isinstance(rel, str) or not rel:
        raise VlmpruneError(f"{where} must be a relative file path, got {_short(rel)}", "re-export the bundle")
    parts = PurePosixPath(rel).parts
    if (rel.startswith("/") or "\\" in rel or "\x00" in rel or ":" in rel.split("/")[0]
            or any(p in ("..", ".", "") for p in rel.split("/")) or not parts):
        raise VlmpruneError(f"{where} names {_short(rel)}, which is not a plain relative path inside the bundle",
                            "bundles may only name their own files; re-export it")
    return rel


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def confined(root: Path, rel: str, where: str) -> Path:
    """``root/rel`` after following symlinks, refused unless it is a regular file inside ``root``."""
    check_relpath(rel, where)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if not real.startswith(real_root + os.sep):
        raise VlmpruneError(f"{where} {rel} leads outside the bundle (a symbolic link to {real})",
                            "copy the bundle without links that point out of it, or re-export")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise VlmpruneError(f"bundle file {rel} is missing from {root}", "re-export the bundle or copy it whole") from None
    except OSError as exc:
        raise VlmpruneError(f"cannot read bundle file {rel}: {exc.strerror}", "check the bundle") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise VlmpruneError(f"bundle file {rel} in {root} is {kind}", "re-export the bundle or copy it again")
    return Path(real)


# --- digests --------------------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sample_offsets(size: int) -> list[int]:
    if size <= SAMPLE_BLOCK:
        return [0]
    last = size - SAMPLE_BLOCK
    return sorted({0, last, *(last * i // (SAMPLE_BLOCKS + 1) for i in range(1, SAMPLE_BLOCKS + 1))})


def sample_digest(path: Path, size: int) -> str:
    digest = hashlib.sha256(f"vlmprune-sample-v1:{size}:{SAMPLE_BLOCK}:{SAMPLE_BLOCKS}".encode())
    with open(path, "rb") as f:
        for offset in sample_offsets(size):
            f.seek(offset)
            digest.update(offset.to_bytes(8, "little"))
            digest.update(f.read(SAMPLE_BLOCK))
    return digest.hexdigest()


def describe_file(path: Path) -> dict:
    size = os.stat(path).st_size
    entry = {"size": size, "sha256": sha256_file(path)}
    if size >= SAMPLE_MIN_BYTES:
        entry["sample"] = sample_digest(path, size)
    return entry


# --- records --------------------------------------------------------------------------------------------------------


def make_record(folder: Path, *, written_by: str, meta: dict | None = None, skip=(RECORD,)) -> dict:
    """A record over every regular file under ``folder`` (what its one writer put there)."""
    from . import __version__

    folder = Path(folder)
    files = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if rel in skip or not path.is_file() or path.is_symlink():
                continue
            files[rel] = describe_file(path)
    record = {"record_version": RECORD_VERSION, "written_by": written_by, "vlmprune": __version__,
              "sample": {"min_bytes": SAMPLE_MIN_BYTES, "block": SAMPLE_BLOCK, "blocks": SAMPLE_BLOCKS},
              "files": files}
    if meta is not None:
        record["meta"] = meta
    return record


def write_record(folder: Path, record: dict) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(Path(folder) / RECORD, json.dumps(record, indent=1) + "\n")


def read_bytes(path: Path, what: str, *, limit: int = MAX_RECORD_BYTES) -> bytes:
    """A small file, every failure one line: missing, not a regular file, too large."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VlmpruneError(f"{what} {path} does not exist", "re-export the bundle or copy it whole") from None
    except OSError as exc:
        raise VlmpruneError(f"cannot read {what} {path}: {exc.strerror}", "check the bundle") from None
    if not stat.S_ISREG(st.st_mode):
        raise VlmpruneError(f"{what} {path} is not a regular file", "re-export the bundle")
    if st.st_size > limit:
        raise VlmpruneError(f"{what} {path} is {st.st_size} bytes, more than any vlmprune writes ({limit})",
                            "re-export the bundle")
    with open(path, "rb") as f:
        return f.read(limit + 1)


def parse_json(data: bytes, what: str) -> Any:
    """JSON from bytes, every failure one line: not UTF-8, not JSON, nested too deeply."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VlmpruneError(f"{what} is not UTF-8 text (byte {exc.start})", "re-export the bundle") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise VlmpruneError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})", "re-export the bundle") from None
    except RecursionError:
        raise VlmpruneError(f"{what} is nested too deeply", "re-export the bundle") from None


def read_json(path: Path, what: str, *, limit: int = MAX_RECORD_BYTES) -> Any:
    return parse_json(read_bytes(path, what, limit=limit), f"{what} {path}")


_HEX = set("0123456789abcdef")


def _digest_ok(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def check_record(record: Any, where: str) -> dict[str, dict]:
    """The ``files`` of a parsed record, with every entry's type and path checked."""
    if not isinstance(record, dict):
        raise VlmpruneError(f"{where} is not a JSON object", "re-export the bundle")
    version = record.get("record_version")
    if type(version) is not int or version < 1:
        raise VlmpruneError(f"{where} has no valid record_version", "re-export the bundle")
    if version > RECORD_VERSION:
        raise VlmpruneError(f"{where} has record version {version}, newer than this vlmprune reads ({RECORD_VERSION})",
                            "upgrade vlmprune here")
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise VlmpruneError(f"{where} lists no files", "re-export the bundle")
    for rel, entry in files.items():
        check_relpath(rel, f"{where} entry")
        if rel == RECORD:
            raise VlmpruneError(f"{where} lists itself", "re-export the bundle")
        if not isinstance(entry, dict):
            raise VlmpruneError(f"{where} entry {rel} is not an object", "re-export the bundle")
        size = entry.get("size")
        if type(size) is not int or size < 0:
            raise VlmpruneError(f"{where} entry {rel} has no valid size", "re-export the bundle")
        if not _digest_ok(entry.get("sha256")) or ("sample" in entry and not _digest_ok(entry["sample"])):
            raise VlmpruneError(f"{where} entry {rel} has no valid sha256", "re-export the bundle")
    return files


def verify_files(root: Path, files: dict[str, dict], mode: str = "quick", *, skip=(),
                 what: str = "bundle file") -> dict[str, Path]:
    """Check every recorded file (confinement, kind, size, then digests); return rel -> confined path.

    An entry without ``size`` (version 1 bundles) is always hashed whole."""
    if mode not in MODES:
        raise VlmpruneError(f"unknown verification mode {mode!r}", f"choose one of {', '.join(MODES)}")
    paths = {rel: confined(root, rel, what) for rel in files}
    for rel, entry in files.items():  # sizes first: a truncated copy fails at once, before any hashing
        if "size" in entry and os.stat(paths[rel]).st_size != entry["size"]:
            raise VlmpruneError(f"{what} {rel} in {root} has {os.stat(paths[rel]).st_size} bytes, the record says "
                                f"{entry['size']} (truncated or altered)", "re-export the bundle or copy it again")
    for rel, entry in files.items():
        if rel in skip:
            continue
        sampled = (mode == "quick" and "sample" in entry and "size" in entry
                   and not rel.lower().endswith(FULL_SUFFIXES))
        ok = (sample_digest(paths[rel], entry["size"]) == entry["sample"]) if sampled else (
            sha256_file(paths[rel]) == entry["sha256"])
        if not ok:
            raise VlmpruneError(f"{what} {rel} in {root} does not match its checksum (altered or corrupted)",
                                "re-export the bundle or copy it again")
    return paths
