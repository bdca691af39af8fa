"""Where an export lands: who owns ``--out``, one writer at a time, and a publish that a crash cannot half-do.

- ``--out`` must be a new folder name, or (with ``--force``) a folder that is a vlmprune bundle: a ``manifest.json``
  written by vlmprune, and nothing at its top level that vlmprune did not write. It is never the model being
  exported (or ``--clip``) nor a folder containing them, never the current folder, never a symbolic link.
- ``claim`` holds an ``flock`` on ``.<name>.lock`` next to ``--out`` from before the model loads until the bundle is
  published, so a second export to the same ``--out`` fails at once instead of both "succeeding".
- The bundle is built in ``.<name>.tmp-<pid>-<tag>`` and put in place by ``atomic.swap_dirs`` (one atomic exchange
  on Linux): the name holds the old bundle or the new one at every instant.
- Leftovers of killed exports next to ``--out`` are removed on the next run (``atomic.clean_leftovers``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from vlmprune.atomic import (LEFTOVER, LOCK, OWNER_SUFFIX, DirLock, clean_leftovers, ensure_folder, make_temp_dir,
                             remove_temp, swap_dirs)
from vlmprune.bundle import DERIVED_DIRS
from vlmprune.errors import VlmpruneError
from vlmprune.integrity import RECORD
from vlmprune.manifest import MANIFEST

_V1_DERIVED = ("calib", "qdq")  # version 1 bundles kept calibration outputs at the top level


def _first_parts(paths) -> set[str]:
    return {p.split("/", 1)[0] for p in paths if isinstance(p, str) and p}


def _manifest_paths(value) -> list[str]:
    from vlmprune.manifest import PATH_KEYS, PATH_SUFFIXES

    found: list[str] = []

    def walk(v, path_key=False):
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(sub, path_key or (isinstance(k, str) and (k in PATH_KEYS or k.endswith(PATH_SUFFIXES))))
        elif isinstance(v, list):
            for sub in v:
                walk(sub, path_key)
        elif isinstance(v, str) and path_key:
            found.append(v)

    walk(value)
    return found


def not_a_bundle(folder: Path) -> str | None:
    """Why ``folder`` may not be replaced by ``--force`` (None when it is a vlmprune bundle)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"has no {MANIFEST}"
    try:
        if manifest_path.stat().st_size > 64 << 20:
            raise ValueError
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return f"has a {MANIFEST} that is not vlmprune's"
    created = manifest.get("created_by") if isinstance(manifest, dict) else None
    if not isinstance(created, dict) or "vlmprune" not in created:
        return f"has a {MANIFEST} that vlmprune did not write"
    owned = {MANIFEST, RECORD, *DERIVED_DIRS, *_V1_DERIVED}
    owned |= _first_parts(_manifest_paths(manifest))
    if isinstance(manifest.get("files"), dict):
        owned |= _first_parts(manifest["files"])
    with contextlib.suppress(OSError, ValueError, AttributeError):
        owned |= _first_parts(json.loads((folder / RECORD).read_bytes().decode("utf-8"))["files"])
    for name in sorted(os.listdir(folder)):
        stem = name[: -len(OWNER_SUFFIX)] if name.endswith(OWNER_SUFFIX) else name
        if name in owned or LEFTOVER.match(stem) or LOCK.match(name) or name.startswith(f".{MANIFEST}"):
            continue
        return f"holds {name!r}, which vlmprune did not write"
    return None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class OutClaim:
    """The locked right to publish one bundle at ``out``."""

    def __init__(self, out: Path, shown: Path, force: bool):
        self.out, self.shown, self.force = out, shown, force
        self.cleaned: list[str] = []

    def check(self, sources=()) -> None:
        """Refuse an ``out`` that exists (without --force), is not a bundle, or holds one of ``sources``."""
        out, shown = self.out, self.shown
        if os.path.islink(out):
            raise VlmpruneError(f"--out {shown} is a symbolic link", "pass the folder it points to, or a new name")
        for source in sources:
            if source and os.path.exists(source) and _inside(os.path.realpath(source), str(out)):
                raise VlmpruneError(f"--out {shown} is (or contains) the model source {source}",
                                    "write the bundle somewhere else")
        if not os.path.lexists(out):
            return
        if not out.is_dir():
            raise VlmpruneError(f"--out {shown} is a file", "choose a folder name for the bundle")
        if not self.force:
            raise VlmpruneError(f"output folder {shown} already exists", "pass --force to replace it or choose --out")
        reason = not_a_bundle(out)
        if reason is not None:
            raise VlmpruneError(f"--force replaces only a vlmprune bundle, and {shown} {reason}",
                                "move it out of the way or choose another --out")

    def make_temp(self) -> Path:
        return make_temp_dir(self.out.parent, self.out.name)

    def publish(self, tmp: Path, sources=()) -> None:
        """Re-check under the lock (something may have appeared at ``out`` during the build), then swap in."""
        self.check(sources)
        old = swap_dirs(tmp, self.out)
        if old is not None:
            remove_temp(old)

    @staticmethod
    def discard(tmp: Path) -> None:
        remove_temp(tmp)


def resolve_out(out: Path) -> Path:
    """``out`` as an absolute path with a real parent; refuses the current folder and the folders holding it."""
    text = str(out)
    if out.name in ("", ".", "..") or text.endswith(("/.", "/..")):
        raise VlmpruneError(f"--out {text} names the current folder or its parent, not a new one",
                            "give a new folder name, e.g. --out exports/my-bundle")
    absolute = Path(os.path.abspath(out))
    ensure_folder(absolute.parent, "--out")
    real = Path(os.path.realpath(absolute.parent)) / absolute.name
    if _inside(os.path.realpath(os.getcwd()), str(real)):
        raise VlmpruneError(f"--out {text} is the current folder or contains it", "give a new folder name")
    return real


@contextlib.contextmanager
def claim(out: Path, force: bool, sources=()):
    """Lock ``out`` for one export and check it may be written; yields an ``OutClaim``."""
    real = resolve_out(Path(out))
    cleaned = clean_leftovers(real.parent)
    with DirLock(real.parent, real.name, f"--out {out}"):
        place = OutClaim(real, Path(out), force)
        place.cleaned = cleaned
        place.check(sources)
        yield place
