"""The pruning methods' names, torch-free, so a command can check ``--method`` (and print its ``--help``) before
torch loads: a typo costs milliseconds, not the 4-13 s of importing torch. ``prune/registry.py`` holds each
method's definition; ``tests/test_cli_ux.py`` checks that both list the same names in the same order."""

from __future__ import annotations

import difflib

from .errors import VlmpruneError

METHOD_NAMES = ("none", "fopru", "gprune", "gridprune", "l2norm", "pool")


def check_method_name(name: str) -> str:
    if name not in METHOD_NAMES:
        close = difflib.get_close_matches(name, METHOD_NAMES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise VlmpruneError(f"unknown pruning method {name!r}", f"{hint}choose one of: {', '.join(METHOD_NAMES)}")
    return name
