"""User-facing errors: one line that names the problem and what to do about it."""


class VlmpruneError(Exception):
    """An error caused by the user's input or environment; the CLIs print it as one line and exit non-zero."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class ArgumentError(VlmpruneError, ValueError):
    """A bad argument to the Python API (``PrunedVLM``): a ``VlmpruneError`` that is also a ``ValueError``, as
    harnesses expect from a call given a wrong value."""
