"""``prune-verify``: check a bundle against its integrity records, every byte (or ``--quick``, what ``prune-run``
does on each start), including the engines and INT8 outputs built into it later."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlmprune.cli_common import main_wrapper


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prune-verify", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("bundle", type=Path, help="bundle folder written by prune-export")
    p.add_argument("--quick", action="store_true",
                   help="sizes, small files hashed and a sample digest of large ones, as prune-run does by default "
                        "(default here: sha256 of every byte)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


@main_wrapper("prune-verify")
def main(argv=None):
    args = _parser().parse_args(argv)
    from vlmprune.bundle import Bundle

    mode = "quick" if args.quick else "full"
    t0 = time.perf_counter()
    bundle = Bundle.open(args.bundle, mode)
    parts = [("bundle", bundle.paths)]
    for name in bundle.engine_names():
        parts.append((f"engines/{name}", bundle.engines(name).paths))
    int8 = bundle.int8()
    if int8 is not None:
        parts.append(("int8", int8.paths))
    files = sum(len(p) for _, p in parts)
    size = sum(path.stat().st_size for _, p in parts for path in p.values())
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"bundle": str(args.bundle), "mode": mode, "ok": True, "files": files, "bytes": size,
                          "parts": [name for name, _ in parts], "seconds": round(seconds, 3)}))
    else:
        print(f"{args.bundle}: ok ({mode} check of {files} files, {size / 2**20:.1f} MiB, in {seconds:.2f}s: "
              f"{', '.join(name for name, _ in parts)})")
    return 0


if __name__ == "__main__":
    main()
