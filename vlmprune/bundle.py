"""The bundle: a folder holding ``manifest.json`` (the one contract between export and runtime, schema in
``vlmprune.manifest``), ``record.json`` (the integrity record of every file the export wrote, ``manifest.json``
included, see ``vlmprune.integrity``) and those files. Torch-free: the runtime imports it.

Outputs made later live in their own subfolders with their own records and never touch the export's:
``engines/<target>-<precision>/`` (prune-build), ``int8/`` (prune-calibrate), ``profile/`` (prune-profile, never
checked). A reader opens a file only through ``Bundle.path``/``Derived.path``, i.e. only a verified file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VlmpruneError
from .integrity import (RECORD, check_record, confined, make_record, parse_json, read_bytes, read_json, verify_files,
                        write_record)
from .manifest import (ENGINES_META, INT8_META, MANIFEST, SCHEMA_VERSION, upgrade_v1, upgrade_v2, validate,
                       validate_meta)

__all__ = ["Bundle", "Derived", "MANIFEST", "RECORD", "SCHEMA_VERSION", "bucket_for", "load_manifest",
           "write_manifest", "DERIVED_DIRS"]

DERIVED_DIRS = ("engines", "int8", "profile")
MAX_MANIFEST_BYTES = 64 << 20
REEXPORT = "re-export the bundle with `prune-export`"


def write_manifest(folder: Path, manifest: dict[str, Any], *, written_by: str = "prune-export") -> None:
    """Seal an export: ``manifest.json``, then ``record.json`` over every file of ``folder`` (the export's private
    temporary folder, so exactly what it wrote), after checking the manifest against the schema."""
    from .atomic import atomic_write_text

    folder = Path(folder)
    manifest.pop("files", None)  # version 1 kept checksums here; the record holds them now
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write_text(folder / MANIFEST, text)
    record = make_record(folder, written_by=written_by)
    try:  # what a reader will see: the JSON, where tuples are lists
        validate(json.loads(text), record["files"], source="the manifest this export wrote")
    except VlmpruneError as exc:
        raise VlmpruneError(exc.problem, "report this as a bug; no bundle was published") from None
    write_record(folder, record)


def check_external_data(rel: str, path: Path, recorded: dict, folder: Path, rebuild: str) -> None:
    """A graph's external-data locations must be recorded files of the same folder: ONNX Runtime opens them relative
    to the graph when it loads it, past every check ``Bundle.path`` makes."""
    if not rel.endswith(".onnx"):
        return
    from .integrity import check_relpath
    from .onnx_wire import external_locations

    base = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    for location in dict.fromkeys(external_locations(path)):
        check_relpath(location, f"{rel}: external data location")
        if base + location not in recorded:
            raise VlmpruneError(f"{rel} reads external data from {location}, which is not in the integrity record of "
                                f"{folder}", rebuild)


@dataclass
class Derived:
    """A verified subfolder written after the export (engines, int8)."""

    folder: Path
    meta: dict
    paths: dict[str, Path] = field(repr=False)

    def path(self, rel: str) -> Path:
        if rel not in self.paths:
            raise VlmpruneError(f"{rel} is not in the integrity record of {self.folder}", "rebuild it")
        check_external_data(rel, self.paths[rel], self.paths, self.folder, "rebuild it")
        return self.paths[rel]


@dataclass
class Bundle:
    folder: Path
    manifest: dict
    manifest_sha: str
    verify: str
    paths: dict[str, Path] = field(repr=False)
    version: int = SCHEMA_VERSION
    _external_checked: set = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def open(cls, folder: str | Path, verify: str | bool = "quick") -> "Bundle":
        """Read, validate and verify a bundle (``verify``: ``quick`` or ``full``, see ``vlmprune.integrity``)."""
        if isinstance(verify, bool):  # the old boolean API: True meant every byte; there is no "off"
            verify = "full" if verify else "quick"
        folder = Path(folder)
        if not folder.exists():
            raise VlmpruneError(f"bundle {folder} does not exist", "export one with `prune-export` or check the path")
        if not folder.is_dir():
            raise VlmpruneError(f"bundle {folder} is not a folder", "point at a `prune-export` output folder")
        if not os.path.lexists(folder / MANIFEST):
            raise VlmpruneError(f"{folder} is not a vlmprune bundle (no {MANIFEST})",
                                "point at a `prune-export` output folder")
        data = read_bytes(confined(folder, MANIFEST, "the manifest"), MANIFEST, limit=MAX_MANIFEST_BYTES)
        manifest = parse_json(data, f"{folder / MANIFEST}")
        if not isinstance(manifest, dict):
            raise VlmpruneError(f"{folder / MANIFEST} is not a JSON object (it is a {type(manifest).__name__})", REEXPORT)
        version = manifest.get("schema_version")
        if type(version) is not int or version < 1:
            raise VlmpruneError(f"{MANIFEST}: schema_version must be an integer >= 1, got {version!r}"[:160], REEXPORT)
        sha = hashlib.sha256(data).hexdigest()
        if version == 1:
            manifest, files = upgrade_v1(manifest)
        else:
            if version > SCHEMA_VERSION:
                raise VlmpruneError(
                    f"bundle schema version {version} is newer than this vlmprune understands ({SCHEMA_VERSION})",
                    "upgrade vlmprune on this machine or re-export with the installed version")
            if not os.path.lexists(folder / RECORD):
                raise VlmpruneError(f"bundle {folder} has no integrity record ({RECORD})",
                                    f"{REEXPORT}, or copy it whole")
            files = check_record(read_json(confined(folder, RECORD, "the record"), "integrity record"), RECORD)
            entry = files.get(MANIFEST)
            if entry is None:
                raise VlmpruneError(f"{RECORD} in {folder} does not cover {MANIFEST}", REEXPORT)
            if entry["size"] != len(data) or entry["sha256"] != sha:
                raise VlmpruneError(f"{MANIFEST} in {folder} does not match the bundle's integrity record "
                                    "(edited after export?)", REEXPORT)
        if version < SCHEMA_VERSION:  # read as the current version (graph I/O kinds); the file stays as it is
            manifest = upgrade_v2(manifest)
        validate(manifest, files)
        paths = verify_files(folder, files, verify, skip={MANIFEST})
        return cls(folder, manifest, sha, verify, paths, version)

    def path(self, rel: str) -> Path:
        """The verified file ``rel``; a path the integrity record does not hold is refused."""
        if rel not in self.paths:
            raise VlmpruneError(f"{rel} is not in the integrity record of {self.folder}", REEXPORT)
        if rel not in self._external_checked:  # a graph's weights files are recorded files too
            check_external_data(rel, self.paths[rel], self.paths, self.folder, REEXPORT)
            self._external_checked.add(rel)
        return self.paths[rel]

    # --- derived outputs -----------------------------------------------------------------------------------------

    def _derived(self, sub: Path, schema, what: str) -> Derived:
        where = f"{sub.relative_to(self.folder).as_posix()}/{RECORD}"
        record = read_json(confined(self.folder, where, what), f"the record of {what}")
        files = check_record(record, where)
        meta = validate_meta(record.get("meta"), schema, files, where)
        if meta["for_manifest"] != self.manifest_sha:
            raise VlmpruneError(f"{what} in {sub} was made for another export of this bundle",
                                f"rebuild it with `{record.get('written_by', 'the command that made it')}`")
        return Derived(sub, meta, verify_files(sub, files, self.verify, what=f"{what} file"))

    def engine_names(self) -> list[str]:
        root = self.folder / "engines"
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / RECORD).is_file() and not p.name.startswith("."))

    def engines(self, name: str) -> Derived:
        if name not in self.engine_names():
            available = ", ".join(self.engine_names()) or "none"
            raise VlmpruneError(f"the bundle has no engines {name!r}",
                                f"build them with prune-build; available: {available}")
        return self._derived(self.folder / "engines" / name, ENGINES_META, f"engines {name}")

    def int8(self) -> Derived | None:
        if not (self.folder / "int8" / RECORD).is_file():
            return None
        return self._derived(self.folder / "int8", INT8_META, "INT8 calibration")


def load_manifest(folder: str | Path, *, verify: str | bool = "quick") -> dict[str, Any]:
    """Read, validate and verify a bundle; its manifest."""
    return Bundle.open(folder, verify).manifest


def bucket_for(manifest: dict[str, Any], keep: float | None) -> tuple[dict[str, Any], str]:
    """The bucket with this keep ratio, or the smallest with keep >= it; and a sentence saying which."""
    buckets = sorted(manifest["vision"]["buckets"], key=lambda b: (b["keep"], b["k"]))
    pruned = [b for b in buckets if b["method"] != "none"] or buckets
    if keep is None:
        chosen = pruned[0]
        return chosen, f"using bucket {chosen['name']} (keep {chosen['keep']}, {chosen['k']} tokens)"
    if not 0 < keep <= 1:
        raise VlmpruneError(f"keep ratio {keep} is outside (0, 1]", "give a fraction such as --keep 0.25")
    exact = [b for b in buckets if abs(b["keep"] - keep) < 1e-9]
    if exact:
        chosen = exact[0]
        return chosen, f"using bucket {chosen['name']} (keep {chosen['keep']}, {chosen['k']} tokens)"
    larger = [b for b in buckets if b["keep"] >= keep]
    if not larger:
        raise VlmpruneError(f"no bucket keeps {keep} or more", f"available: {', '.join(str(b['keep']) for b in buckets)}")
    chosen = larger[0]
    return chosen, (f"no bucket for keep {keep}; using the next larger, {chosen['name']} "
                    f"(keep {chosen['keep']}, {chosen['k']} tokens)")
