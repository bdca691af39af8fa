"""prune-selftest on this machine (no GPU, no TensorRT): every part runs or is skipped with its reason, through the
strict emulated trtexec where one is given; one table on stdout, the same rows as JSON."""

from __future__ import annotations

import json

import pytest

from fake_trt import strict_trtexec
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.export.selftest import main as selftest_main


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("selftest")
    export_bundle(ExportRequest(model="tiny-llava", method="fopru", keeps=[0.25], out=root / "tiny-llava",
                                validate=False), Steps(quiet=True))
    return root


def test_selftest_without_tensorrt_skips_with_reasons(bundles, tmp_path, capsys):
    assert selftest_main.run(["--presets", "tiny-llava", "--bundles", str(bundles), "--out", str(tmp_path / "st"),
                              "--trtexec", "no-such-trtexec"]) == 0
    out = capsys.readouterr().out
    assert "reference (ORT fp32)" in out and "no-such-trtexec was not found on PATH" in out
    rows = json.loads((tmp_path / "st" / "selftest.json").read_text())["rows"]
    by = {r["step"]: r for r in rows}
    assert by["reference (ORT fp32)"]["status"] == "ok" and by["build fp16"]["status"] == "skip"
    assert all(r["detail"] for r in rows if r["status"] == "skip")


def test_selftest_builds_through_the_installed_trtexec(bundles, tmp_path, capsys):
    trtexec = strict_trtexec(tmp_path, "10.3.0")
    assert selftest_main.run(["--presets", "tiny-llava", "--bundles", str(bundles), "--out", str(tmp_path / "st"),
                              "--trtexec", str(trtexec), "--json-out", str(tmp_path / "t.json")]) == 0
    rows = {r["step"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert rows["build fp16"]["status"] == "ok" and rows["build int8 (calibrated)"]["status"] == "ok"
    run = rows["prune-run --engines trt10-fp16 --require-gpu"]
    assert run["status"] == "skip" and "no NVIDIA GPU" in run["detail"]
    assert (bundles / "tiny-llava" / "engines" / "trt10-int8" / "fopru-k144.engine").exists()


def test_selftest_refuses_an_unknown_preset(capsys):
    assert selftest_main.run(["--presets", "tiny-llama"]) == 2
    assert "unknown preset 'tiny-llama'" in capsys.readouterr().err
