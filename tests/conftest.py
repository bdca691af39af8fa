from __future__ import annotations

import os
import tempfile

import pytest

# Presets are built once per test session in a private cache unless the caller chose one.
os.environ.setdefault("VLMPRUNE_CACHE", tempfile.mkdtemp(prefix="vlmprune-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny():
    torch = pytest.importorskip("torch")
    from vlmprune.models import load_model

    torch.set_grad_enabled(False)
    return load_model("tiny-llava")
