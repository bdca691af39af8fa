"""Crash-safe file-system steps shared by every writer (export, build, calibrate, profile, viz, the preset cache).

- Temporary folders are named ``.<name>.tmp-<pid>-<tag>`` and get an owner sidecar ``<that>.vlmprune-owner`` (pid,
  process start time, boot id, host) *before* they are created, so that a later run can tell a leftover of a dead
  vlmprune process from anything else and remove it (``clean_leftovers``). Nothing without that name and sidecar
  is ever removed.
- ``swap_dirs`` puts a finished folder at its name with one ``renameat2(RENAME_EXCHANGE)``: at every instant the
  name holds the old folder or the new one. That call is Linux-only (ext4, xfs, btrfs, tmpfs, overlayfs); on file
  systems without it (NFS, vfat) the fallback is two renames whose crash window leaves the old folder under a
  hidden name that ``clean_leftovers`` puts back on the next run.
- ``DirLock`` is an ``flock`` on ``.<name>.lock`` next to the target: the kernel drops it when its holder dies, so a
  killed writer never blocks the next one.
Written by hand because the standard library has no exchange-rename, and the lock/leftover rules are ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from .errors import VlmpruneError

OWNER_SUFFIX = ".vlmprune-owner"
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")
LOCK = re.compile(r"^\.(?P<name>.+)\.lock$")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_renameat2 = None
try:  # glibc >= 2.28 exports renameat2; musl and other systems fall back to plain renames
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except (OSError, AttributeError):
    _renameat2 = None
USE_RENAMEAT2 = _renameat2 is not None  # tests turn it off to exercise the fallback


class Unsupported(Exception):
    pass


def _rename2(src: Path, dst: Path, flags: int) -> None:
    if not USE_RENAMEAT2:
        raise Unsupported
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        raise Unsupported
    raise OSError(err, os.strerror(err), str(dst))


# --- owners of temporary folders -------------------------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot), which tells a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def owner() -> dict:
    pid = os.getpid()
    return {"vlmprune": True, "pid": pid, "start": _proc_start(pid), "boot": _boot_id(), "host": socket.gethostname()}


def owner_alive(info: dict) -> bool:
    """Whether the process that wrote ``info`` may still run. Unknown cases count as alive: then nothing is removed."""
    if info.get("host") != socket.gethostname():
        return True  # another machine sharing the folder: we cannot see its processes
    if info.get("boot") and _boot_id() and info["boot"] != _boot_id():
        return False  # written before the last reboot
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _proc_start(pid)
    return not (info.get("start") and start and start != info["start"])  # same pid, other process: owner is dead


def _write_small(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.part-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def make_temp_dir(parent: Path, name: str, *, restore_to: str | None = None, kind: str = "tmp") -> Path:
    """A new folder ``parent/.<name>.<kind>-<pid>-<tag>`` with its owner sidecar (written first, so a crash between
    the two leaves a sidecar that the cleaner removes, never an unmarked folder). Normal permissions (umask), not
    mkdtemp's 0700: bundles and the preset cache are shared."""
    parent = Path(parent)
    for _ in range(100):
        path = parent / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        sidecar = path.with_name(path.name + OWNER_SUFFIX)
        if os.path.lexists(path) or os.path.lexists(sidecar):
            continue
        _write_small(sidecar, json.dumps({**owner(), **({"restore_to": restore_to} if restore_to else {})}))
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        except BaseException:
            _unlink(sidecar)
            raise
        return path
    raise VlmpruneError(f"cannot create a temporary folder in {parent}", "check the folder")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove_temp(path: Path) -> None:
    """Remove a temporary folder made by ``make_temp_dir`` (or a folder swapped out to its name), then its sidecar."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        _unlink(path)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        _unlink(path.with_name(path.name + OWNER_SUFFIX))


def _read_owner(sidecar: Path) -> dict | None:
    try:
        if not sidecar.is_file() or sidecar.stat().st_size > 4096:
            return None
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("vlmprune") is True else None


def clean_leftovers(parent: Path) -> list[str]:
    """Remove what dead vlmprune processes left in ``parent``: temporary folders (by name *and* owner sidecar), and
    restore an old folder that a two-rename swap moved aside when the crash came before the new one arrived.
    Returns what was done, one line each."""
    parent = Path(parent)
    done: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return done
    for entry in entries:
        if not entry.name.endswith(OWNER_SUFFIX):
            continue
        stem = entry.name[: -len(OWNER_SUFFIX)]
        match = LEFTOVER.match(stem)
        info = _read_owner(Path(entry.path))
        if match is None or info is None or owner_alive(info):
            continue
        folder = parent / stem
        restore = info.get("restore_to")
        if (match["kind"] == "old" and isinstance(restore, str) and "/" not in restore and folder.is_dir()
                and not os.path.lexists(parent / restore)):
            with contextlib.suppress(OSError):
                os.rename(folder, parent / restore)
                _unlink(Path(entry.path))
                done.append(f"restored {parent / restore} (a replacement was interrupted)")
                continue
        remove_temp(folder)
        done.append(f"removed {folder} (left by process {info.get('pid')}, no longer running)")
    return done


# --- publishing ---------------------------------------------------------------------------------------------------


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists (even an empty folder, which plain rename
    would silently replace)."""
    try:
        _rename2(src, dst, _RENAME_NOREPLACE)
        return
    except Unsupported:
        pass
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


def swap_dirs(new: Path, dest: Path) -> Path | None:
    """Put the folder ``new`` at ``dest``. Returns where the previous ``dest`` now is (for the caller to remove with
    ``remove_temp``), or None if there was none."""
    new, dest = Path(new), Path(dest)
    sidecar = new.with_name(new.name + OWNER_SUFFIX)
    if not os.path.lexists(dest):
        rename_noreplace(new, dest)
        _unlink(sidecar)  # the folder is published: nothing is left for the sidecar to mark
        return None
    try:
        _rename2(new, dest, _RENAME_EXCHANGE)  # one atomic step: old and new trade places
        return new  # the old folder now carries the temporary name and its owner sidecar
    except Unsupported:
        pass
    old = make_temp_dir(dest.parent, dest.name, restore_to=dest.name, kind="old")
    os.rmdir(old)  # only the name and the sidecar are needed: a crash from here on restores ``dest`` from ``old``
    os.rename(dest, old)
    os.rename(new, dest)
    _unlink(sidecar)
    return old


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file by temporary name + rename, so readers never see it half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        # a new file only (O_EXCL, O_NOFOLLOW): never written through something already at the temporary name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_output(path: Path):
    """``with atomic_output(p) as tmp: write tmp`` -> ``tmp`` is renamed to ``p`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def ensure_folder(path: Path, what: str) -> None:
    """Create ``path`` (and its parents) or say in one line why it cannot be a folder."""
    path = Path(path)
    for p in [path, *path.parents]:
        if os.path.lexists(p):
            if not p.is_dir():
                raise VlmpruneError(f"{what} {path} is under {p}, which is a file, not a folder", "choose another path")
            break
    path.mkdir(parents=True, exist_ok=True)


# --- locking --------------------------------------------------------------------------------------------------------


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.<name>.lock``; ``VlmpruneError`` if another process holds it.

    The lock file is removed on release; a holder re-checks after locking that the path still names its file, so a
    file unlinked by the previous holder is never trusted."""

    def __init__(self, folder: Path, name: str, what: str):
        self.path = Path(folder) / f".{name}.lock"
        self.what = what
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                finally:
                    os.close(fd)
                raise VlmpruneError(f"another vlmprune process (pid {holder}) is writing {self.what}",
                                    "wait for it to finish, or choose another output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked it between our open and our lock: take the new file
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd
            return self
        raise VlmpruneError(f"cannot lock {self.path}", "retry")

    def __exit__(self, *exc):
        if self.fd is not None:
            _unlink(self.path)
            os.close(self.fd)
            self.fd = None
        return False
