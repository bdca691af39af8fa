"""The bundle manifest: the one contract between export and runtime. Torch-free: the runtime imports it.

A bundle is a folder holding ``manifest.json`` and the files it lists with their sha256. Everything the runtime
needs (shapes, dtypes, buckets, preprocessing constants, tokenizer, chat template, decoder I/O) is in the manifest;
nothing is guessed twice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import VlmpruneError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Files a bundle may hold that the runtime never reads, so they are not checksummed: calibration batches.
UNLISTED = (MANIFEST, "calib/pixel_values.npy")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path, exclude=UNLISTED) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in exclude
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write atomically (temporary file, then rename): a manifest is never seen half-written."""
    import os

    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, folder / MANIFEST)


def load_manifest(folder: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read and check a bundle's manifest: schema version, files present, checksums (``verify``)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise VlmpruneError(f"bundle {folder} does not exist", "export one with `prune-export` or check the path")
    if not path.exists():
        raise VlmpruneError(f"{folder} is not a vlmprune bundle (no {MANIFEST})", "point at a `prune-export` output folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VlmpruneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", "re-export the bundle") from None
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise VlmpruneError(
            f"bundle schema version {version} is newer than this vlmprune understands ({SCHEMA_VERSION})",
            "upgrade vlmprune on this machine or re-export with the installed version",
        )
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    for rel, expected in manifest.get("files", {}).items():
        path = folder / rel
        if not path.exists():
            raise VlmpruneError(f"bundle file {rel} is missing from {folder}", "re-export the bundle or copy it whole")
        if sha256_file(path) != expected:
            raise VlmpruneError(
                f"bundle file {rel} in {folder} does not match its checksum (altered or truncated)",
                "re-export the bundle or copy it again",
            )


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
