from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Presets are built once per test session in a private cache that the session removes at its end: never in the
# user's VLMPRUNE_CACHE (the bench presets alone are about 300 MB). VLMPRUNE_TEST_CACHE names a folder to keep
# between runs instead (faster reruns); that one is the caller's to remove.
_KEPT = os.environ.get("VLMPRUNE_TEST_CACHE")
_CACHE = _KEPT or tempfile.mkdtemp(prefix="vlmprune-test-cache-")
os.environ["VLMPRUNE_CACHE"] = _CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_sessionfinish(session, exitstatus):
    if not _KEPT:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny():
    torch = pytest.importorskip("torch")
    from vlmprune.models import load_model

    torch.set_grad_enabled(False)
    return load_model("tiny-llava")
