"""prune-doctor: the machine's findings, a bundle against it, one line each, --json, and the exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fake_trt import strict_trtexec
from vlmprune.export.doctor import MISSING, inspect_machine, main as doctor_main, report
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.export.trt_build import main as build_main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    return export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=root / "b", validate=False),
                         Steps(quiet=True)).path


def orin_root(tmp_path: Path, mem_kb: int = 64 << 20) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic\n")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_text("NVIDIA Jetson AGX Orin Developer Kit\x00")
    (root / "proc/meminfo").write_text(f"MemTotal:       {mem_kb} kB\n")
    return root


def orin(tmp_path, trtexec: Path | None, mem_kb: int = 64 << 20, providers=None):
    m = inspect_machine(orin_root(tmp_path, mem_kb), which=lambda n: str(trtexec) if trtexec and n == "trtexec" else None,
                        cuda=False)
    m.tensorrt = None  # this machine's Python has no tensorrt: the trtexec banner says the version
    if providers is not None:
        m.ort_providers, m.ort_version = providers, "1.22.0"
    return m


def test_this_machine_names_the_gpu_and_tensorrt_missing_in_one_line_each(capsys):
    assert doctor_main.run([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith(f"[{MISSING}] GPU: ")]
    assert [line for line in out if line.startswith(f"[{MISSING}] TensorRT: ")]
    assert all("fix: " in line for line in out if line.startswith(f"[{MISSING}]"))
    assert any("ONNX Runtime" in line for line in out)


def test_bundle_that_cannot_run_on_the_gpu_exits_1_with_json(bundle, capsys):
    assert doctor_main.run([str(bundle), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["gpu_ready"] is False and {f["check"] for f in data["findings"]} >= {"GPU", "TensorRT", "memory"}


def test_bad_bundle_is_one_line(tmp_path, capsys):
    assert doctor_main.run([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_orin_with_tensorrt_8_5_and_a_trt10_bundle(bundle, tmp_path):
    m = orin(tmp_path, strict_trtexec(tmp_path, "8.5.2"))
    assert m.jetpack == "6.1/6.2" and m.trtexec_version == (8, 5, 2) and m.gpu_memory == 64 << 30
    result = report(bundle, m)
    target = next(f for f in result["findings"] if f["check"] == "bundle target")
    assert target["status"] == "fail" and "fails the trt8.5 lint" in target["found"]
    assert "--target trt8.5" in target["fix"] and result["gpu_ready"] is False


def test_orin_with_engines_built_here_is_ready(bundle, tmp_path):
    trtexec = strict_trtexec(tmp_path, "10.3.0")
    path = Path(shutil.copytree(bundle, tmp_path / "b"))
    assert build_main.run([str(path), "--target", "trt10", "--trtexec", str(trtexec)]) == 0
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    result = report(path, orin(tmp_path, trtexec, providers=cuda))
    by = {f["check"]: f for f in result["findings"]}
    assert by["engines trt10-fp16"]["status"] == "ok" and by["bundle target"]["status"] == "ok"
    assert by["memory"]["status"] == "ok" and result["gpu_ready"] is True
    # the same engines on a TensorRT 10.13 machine are refused, with the fix
    result = report(path, orin(tmp_path / "x", strict_trtexec(tmp_path, "10.13.0"), providers=cuda))
    by = {f["check"]: f for f in result["findings"]}
    assert by["engines trt10-fp16"]["status"] == "fail" and "rebuild them here" in by["engines trt10-fp16"]["fix"]
    # too little memory
    result = report(path, orin(tmp_path / "y", trtexec, mem_kb=1, providers=cuda))
    assert next(f for f in result["findings"] if f["check"] == "memory")["status"] == "fail"
    assert result["gpu_ready"] is False


def test_int8_decoder_on_an_old_onnxruntime(bundle, tmp_path, monkeypatch):
    from vlmprune.bundle import Bundle
    from vlmprune.export.doctor import bundle_findings

    opened = Bundle.open(bundle)
    opened.manifest["decoder"]["quantization"] = {"bits": 8}
    m = orin(tmp_path, strict_trtexec(tmp_path, "10.3.0"), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    m.ort_version = "1.20.1"
    findings, ready = bundle_findings(opened, m)
    dec = next(f for f in findings if f.check == "decoder")
    assert dec.status == "fail" and "1.22" in dec.found and not ready


def test_doctor_runs_on_the_base_install(bundle):
    """torch, onnx, polygraphy, tensorrt ... unimportable, as on an edge box with `pip install vlmprune`."""
    import subprocess
    import sys
    import textwrap

    from test_cli_ux import BLOCKED

    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from vlmprune.export.doctor import main
        code = main.run([{str(bundle)!r}])
        assert not any(m.split(".")[0] in {BLOCKED!r} for m in sys.modules), "a heavy module was imported"
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # this machine has no GPU: the bundle cannot run on it
    assert "[missing] GPU: " in done.stdout and "Traceback" not in done.stderr
