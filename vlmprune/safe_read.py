"""Reading a file the user named, as untrusted input: a regular file only (a FIFO would block the reader forever, a
device has no end), checked on the open descriptor so a file swapped after a check cannot slip through, and
bounded in size. One ``VlmpruneError`` line for each refusal."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import VlmpruneError

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file (a device or socket)"


def read_regular(path: Path, what: str, max_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """The whole file, or one line saying why not (missing, not a regular file, over ``max_bytes``)."""
    path = Path(path)
    flags = _FLAGS | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise VlmpruneError(f"{what} {path} does not exist", "check the path") from None
    except OSError as exc:
        if not follow_symlinks and os.path.islink(path):
            raise VlmpruneError(f"{what} {path} is a symbolic link", "pass the file itself") from None
        raise VlmpruneError(f"cannot open {what} {path}: {exc.strerror}",
                            "check the path and its permissions") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VlmpruneError(f"{what} {path} is {kind_of(st.st_mode)}", "pass a regular file")
        if st.st_size > max_bytes:
            raise VlmpruneError(f"{what} {path} is {st.st_size / 2**20:.0f} MiB, over the {max_bytes >> 20} MiB limit",
                                "split it or pass a smaller file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise VlmpruneError(f"{what} {path} is over the {max_bytes >> 20} MiB limit", "pass a smaller file")
    return data


def loads_bounded(text: str | bytes):
    """``json.loads`` that turns a document nested too deep for the parser (a RecursionError inside the standard
    library's decoder) into ``ValueError``, like any other malformed JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
