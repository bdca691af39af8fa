"""Crafting bundles as a careful attacker (or a bug) would: edit the manifest and re-seal its entry in the record,
so that the schema and confinement checks must hold on their own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def reseal(folder: Path, manifest) -> None:
    """Write a crafted manifest (a JSON value, text or bytes) and update the record's entry for it."""
    data = (json.dumps(manifest) if not isinstance(manifest, bytes) else manifest)
    data = data.encode() if isinstance(data, str) else data
    (folder / "manifest.json").write_bytes(data)
    record = json.loads((folder / "record.json").read_text())
    record["files"]["manifest.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "record.json").write_text(json.dumps(record))


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def edit(path: list, value):
    """``manifest -> manifest`` with the field at ``path`` set to ``value`` (``KeyError``: deleted)."""
    def apply(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return m
    return apply
