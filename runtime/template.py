"""Chat templates from a bundle, rendered in jinja2's immutable sandbox (the environment transformers uses) and
bounded: a template is untrusted input, so rendering stops after ``TIME_LIMIT_S`` seconds or ``MAX_OUTPUT_CHARS``
characters, and the operations that build huge values in one step (``'x' * n``, ``n ** m``, ``'%09999999d' % 1``,
``'{:>9999999}'.format(1)``, ``center(n)``, ...) are refused above ``MAX_ARG``.

The time limit is enforced with a ``sys.settrace`` hook on the rendering thread: jinja2 compiles a template to
Python code, so every loop iteration passes through it (a thread or signal timer could not stop the render, and
an alarm signal is process-wide). Every failure is one line.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from typing import Any

from vlmprune.errors import VlmpruneError

TIME_LIMIT_S = 2.0
MAX_OUTPUT_CHARS = 1 << 20
MAX_ARG = 100_000  # the largest integer argument or repeat count a template may use (jinja2's own range limit)
_WIDE_FORMAT = re.compile(r"\d{6,}")


class _Timeout(BaseException):  # not an Exception: no broad except inside jinja2 may swallow it
    pass


def _too_big(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and abs(n) > MAX_ARG


def _guard_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise VlmpruneError("the chat template formats with a width of a million characters or more",
                            "the bundle's template is hostile or broken; re-export the bundle")


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                count = right if _sized(left) else left if _sized(right) else None
                size = max(_sized(left), _sized(right))
                if count is not None and isinstance(count, int) and count * size > MAX_OUTPUT_CHARS:
                    raise VlmpruneError("the chat template builds a value of more than a million characters",
                                        "the bundle's template is hostile or broken; re-export the bundle")
            elif operator == "**" and (_too_big(right) or (isinstance(right, int) and isinstance(left, int)
                                                              and abs(left).bit_length() * abs(right) > 1 << 16)):
                raise VlmpruneError("the chat template computes a power too large to hold",
                                    "the bundle's template is hostile or broken; re-export the bundle")
            elif operator == "%":
                _guard_format(left)
            elif operator == "+" and _sized(left) + _sized(right) > MAX_OUTPUT_CHARS:
                raise VlmpruneError("the chat template builds a value of more than a million characters",
                                    "the bundle's template is hostile or broken; re-export the bundle")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
            if any(_too_big(a) for a in (*args, *kwargs.values())):
                raise VlmpruneError(f"the chat template calls a function with an argument over {MAX_ARG}",
                                    "the bundle's template is hostile or broken; re-export the bundle")
            method = getattr(__obj, "__wrapped__", __obj)  # jinja2 wraps str.format in its sandboxed formatter
            if getattr(method, "__name__", None) in ("format", "format_map") and isinstance(
                    getattr(method, "__self__", None), str):
                _guard_format(method.__self__)
            return super().call(__context, __obj, *args, **kwargs)

    env = Bounded(trim_blocks=True, lstrip_blocks=True)  # the settings transformers uses for chat templates
    for name, fn in list(env.filters.items()):  # filters are called directly, not through ``call``
        env.filters[name] = _guarded_filter(fn)

    def raise_exception(message):
        raise VlmpruneError(f"chat template: {message}", "check the prompt")

    env.globals["raise_exception"] = raise_exception
    return env


def _guarded_filter(fn):
    @functools.wraps(fn)  # keeps jinja2's pass_context / pass_environment markers
    def guarded(*args, **kwargs):
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise VlmpruneError(f"the chat template passes a filter an argument over {MAX_ARG}",
                                "the bundle's template is hostile or broken; re-export the bundle")
        if fn.__name__ == "do_format" and args:
            _guard_format(next((a for a in args if isinstance(a, str)), None))
        return fn(*args, **kwargs)

    return guarded


def _describe(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:200]


class ChatTemplate:
    def __init__(self, source: str):
        from jinja2 import TemplateError

        try:
            self.template = _environment().from_string(source)
        except TemplateError as exc:
            raise VlmpruneError(f"the bundle's chat template does not compile ({_describe(exc)})",
                                "re-export the bundle") from None
        except (RecursionError, MemoryError, ValueError) as exc:
            raise VlmpruneError(f"the bundle's chat template cannot be read ({_describe(exc)})",
                                "re-export the bundle") from None

    def render(self, **context) -> str:
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        deadline = time.monotonic() + TIME_LIMIT_S
        ticks = 0

        def tracer(frame, event, arg):
            nonlocal ticks
            ticks += 1
            if not ticks & 0x3FF and time.monotonic() > deadline:
                raise _Timeout
            return tracer

        chunks, size = [], 0
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            for chunk in self.template.generate(**context):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise VlmpruneError(f"the chat template writes more than {MAX_OUTPUT_CHARS} characters",
                                        "the bundle's template is hostile or broken; re-export the bundle")
                chunks.append(chunk)
        except _Timeout:
            raise VlmpruneError(f"the chat template ran for more than {TIME_LIMIT_S:g} s",
                                "the bundle's template is hostile or broken; re-export the bundle") from None
        except VlmpruneError:
            raise
        except SecurityError as exc:
            raise VlmpruneError(f"the chat template tried an unsafe operation ({_describe(exc)})",
                                "the bundle's template is hostile; re-export the bundle") from None
        except TemplateError as exc:
            raise VlmpruneError(f"the chat template failed ({_describe(exc)})", "re-export the bundle") from None
        except Exception as exc:  # anything a template raises (TypeError, ZeroDivisionError, ...) is the template's
            raise VlmpruneError(f"the chat template failed ({_describe(exc)})", "re-export the bundle") from None
        finally:
            sys.settrace(previous)
        return "".join(chunks)
