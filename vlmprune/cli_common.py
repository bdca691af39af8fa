"""What every console script shares: one-line errors and a non-zero exit for the user's mistakes."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys

from .errors import VlmpruneError


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # our own step lines report progress; the library's per-load bars would interleave with them
        from transformers.utils import logging as hf_logging
    except ImportError:  # the edge runtime has no transformers
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# The machine's state, not a bug: a full or read-only disk, permissions, a path through a file. One line, exit 2
# (writers clean up their temporary folders before the error reaches here).
_ENVIRONMENT = {
    errno.ENOSPC: "free some space or write elsewhere; nothing half-written was left in place",
    errno.EDQUOT: "the disk quota is full; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "check the permissions, or write elsewhere",
    errno.EPERM: "check the permissions, or write elsewhere",
    errno.EFBIG: "the file system cannot hold a file this large; write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EIO: "the disk reported an input/output error; check it",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, without "(default: None)" / "(default: False)" noise on unset options and
    flags, and without repeating a default that the help text already states."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS):  # flags
            return text
        return super()._get_help_string(action)


def add_session_args(p: argparse.ArgumentParser, *, decoder: bool = True, engines_help: str = "") -> None:
    """The options every command that runs a bundle takes, in one group (as Polygraphy groups its runner options):
    where the graphs run and how the kept tokens are numbered. Their values go to ``open_bundle`` unchanged."""
    g = p.add_argument_group("running the bundle")
    g.add_argument("--positions", choices=["contiguous", "original"],
                   help="position ids of the kept image tokens (default: the bundle's own, recorded at export from "
                        "its family and method)")
    g.add_argument("--provider", help="ONNX Runtime provider for graphs without an engine (default: TensorRT, CUDA, "
                                      "CPU, whichever is present; the decoder skips TensorRT unless it is named)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="ONNX Runtime intra-op threads (default: ONNX Runtime's, all cores)")
    g.add_argument("--engines", metavar="KEY", help=engines_help or (
        "run every graph that has a TensorRT engine from prune-build on TensorRT (vision buckets, text encoder, "
        "decoder), e.g. trt10-fp16"))
    if decoder:
        g.add_argument("--decoder", default="auto", choices=["auto", "fused", "plain"],
                       help="LLM decoder: auto takes the --engines decoder engine where there is one, else the fused "
                            "one (decoder_fused.onnx) where the bundle has it and the provider is CPU/CUDA, else the "
                            "standard-op one; fused or plain force that ONNX Runtime decoder (default: auto)")


def session_kwargs(args) -> dict:
    """``open_bundle`` keyword arguments from ``add_session_args``'s options."""
    out = {k: getattr(args, k) for k in ("positions", "provider", "threads", "engines")}
    if hasattr(args, "decoder"):
        out["decoder"] = args.decoder
    return out


def parse_list(text: str | None, kind, flag: str) -> list:
    """A comma-separated list of numbers (``--keep 0.25,0.5``), checked before any heavy import."""
    if text is None:
        return []
    try:
        return [kind(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise VlmpruneError(f"{flag} {text!r} is not a comma-separated list of numbers", f"e.g. {flag} 0.25,0.5") from None


def require_extra(prog: str, extra: str, *modules: str) -> None:
    """One line naming the pip extra when a command needs what the base (edge) install leaves out, instead of an
    ImportError traceback from deep inside the command."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise VlmpruneError(
            f"{prog} needs {', '.join(missing)}, which the base (edge) install leaves out",
            f'install the {extra} extra: pip install "vlmprune[{extra}]" (in a checkout: pip install -e ".[{extra}]")',
        )


def main_wrapper(prog: str):
    """Run a CLI entry point: a ``VlmpruneError`` becomes ``<prog>: error: <one line>`` and exit code 2.

    ``entry.run(argv)`` returns the exit code instead of exiting (for tests)."""
    return functools.partial(_wrap, prog)


def _wrap(prog, fn):
    @functools.wraps(fn)
    def run(argv=None):
        try:
            return fn(argv) or 0
        except VlmpruneError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"{prog}: error: {exc.strerror or exc}{where}; {_ENVIRONMENT[exc.errno]}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    def entry(argv=None):
        sys.exit(run(argv))

    entry.run = run
    return entry
