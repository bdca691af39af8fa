"""``prune-eval``'s ``--out``: a folder prune-eval owns, as ``prune-export`` owns its bundle.

A marker file (``.prune-eval``) says the folder is ours. An empty or new folder is claimed; a folder of files
prune-eval did not write is refused, never overwritten; an older prune-eval's folder (only our names, a results
file with our header) is claimed as it is. Every file prune-eval writes there must be absent or a regular file of
its own: a symbolic link, a folder or a FIFO at one of those names is refused, so nothing is written through a
link to elsewhere and nothing blocks. ``--out`` must not be, or lie inside, the folder of images being read (its
``pareto.png`` would become an item of the next run).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from vlmprune.atomic import atomic_write_text
from vlmprune.errors import VlmpruneError
from vlmprune.safe_read import kind_of

MARKER = ".prune-eval"
OUTPUTS = ("results.jsonl", "summary.json", "summary.md", "pareto.png")
_RESULTS_HEADER = b'{"prune_eval_results"'


def _ours(name: str) -> bool:
    """A name prune-eval writes: its outputs, the marker, and the hidden temporary files of an atomic write."""
    return name in OUTPUTS or name == MARKER or (name.startswith(".") and ".part-" in name
                                                 and name[1:].split(".part-")[0] in OUTPUTS)


def _older_eval_folder(out: Path, names: list[str]) -> bool:
    if "results.jsonl" not in names or not all(_ours(n) for n in names):
        return False
    try:
        fd = os.open(out / "results.jsonl", os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        return stat.S_ISREG(os.fstat(fd).st_mode) and f.read(len(_RESULTS_HEADER)) == _RESULTS_HEADER


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def claim_out(out: Path, scanned: Path | None = None) -> None:
    """Make ``out`` prune-eval's folder, or say in one line why it cannot be. ``scanned``: the folder whose images
    are the dataset (an image-folder dataset), which ``out`` must stay out of."""
    out = Path(out)
    if os.path.islink(out):
        raise VlmpruneError(f"--out {out} is a symbolic link", "pass the folder itself, or a new folder")
    if os.path.lexists(out) and not out.is_dir():
        raise VlmpruneError(f"--out {out} is a file, not a folder", "pass a new folder, or a folder prune-eval wrote")
    real = Path(os.path.realpath(out))
    if scanned is not None and _inside(real, Path(os.path.realpath(scanned))):
        raise VlmpruneError(f"--out {out} is inside the image folder {scanned} being evaluated (its outputs would "
                            "become items of the next run)", "pass an --out outside the image folder")
    for parent in [out, *out.parents]:  # a file on the way is one line, not a traceback from mkdir
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise VlmpruneError(f"--out {out} is under {parent}, which is a file", "pass another --out folder")
            break
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(out))
    marker = out / MARKER
    if MARKER in names:
        st = os.lstat(marker)
        if not stat.S_ISREG(st.st_mode):
            raise VlmpruneError(f"{marker} is {kind_of(st.st_mode)}, not prune-eval's marker file",
                                "pass another --out folder")
    elif names and not _older_eval_folder(out, names):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise VlmpruneError(f"--out {out} holds files prune-eval did not write ({shown})",
                            "pass a new or empty folder (prune-eval replaces its own outputs there)")
    for name in OUTPUTS:
        path = out / name
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise VlmpruneError(f"{path} is {kind_of(st.st_mode)}; prune-eval writes only regular files of its "
                                    "own there", "remove it, or pass another --out folder")
    if MARKER not in names:
        atomic_write_text(marker, json.dumps({"prune_eval_out": 1}) + "\n")
