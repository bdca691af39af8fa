"""The family contract (issue 20): a family is its folder plus a registry line, and nothing outside ``models/<family>/``
names a family.

The proof is a test-only family: a renamed copy of ``models/llava/`` made in a temporary folder and registered through
``VLMPRUNE_FAMILIES`` (no file of the package changes). It exports, runs, evaluates and draws through the commands,
and the bundle it writes is dispatched to the copy's runtime hooks.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from vlmprune.models import registry

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("export", "runtime", "calibrate", "prune", "vlmprune")
FAMILY_WORDS = re.compile(r"qwen|anyres|llava|model_type\s*==|recipe\.(layout|preprocess)\s*==", re.I)


def _code_lines(path: Path):
    """(line number, text) of the code of ``path``, docstrings and comments left out."""
    tree = ast.parse(path.read_text())
    docs = {n.body[0].value.lineno for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
            and isinstance(n.body[0].value.value, str)}
    doc_lines = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and n.value.lineno in docs:
            doc_lines.update(range(n.value.lineno, n.value.end_lineno + 1))
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if i not in doc_lines:
            yield i, line.split("#", 1)[0]


def test_no_module_outside_the_family_folders_is_named_after_or_imports_a_family():
    families = set(registry.families())
    for folder in SHARED:
        for path in (ROOT / folder).rglob("*.py"):
            assert not FAMILY_WORDS.search(path.stem), path
            for i, line in _code_lines(path):
                for fam in families:
                    assert f"vlmprune.models.{fam}" not in line, f"{path}:{i} imports family {fam}: {line.strip()}"


def test_shared_code_has_no_family_dispatch():
    """No branch on a family's name, model type, layout or preprocessing kind outside the family folders (the
    names in default preset names and user-facing help text are not branches)."""
    branch = re.compile(r"(if|elif|==|!=|\bin\b).*['\"](qwen\w*|llava\w*|anyres\w*|qwen2_vl)['\"]", re.I)
    found = []
    for folder in SHARED:
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in _code_lines(path):
                if branch.search(line) and "default" not in line and "help=" not in line:
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_family_runtime_parts_import_without_torch():
    import subprocess

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from vlmprune.models.registry import families\n"
            "for fam in families().values():\n"
            "    fam.runtime_class()\n"
            "import vlmprune.runtime.pipeline, vlmprune.runtime.api, vlmprune.calibrate.data\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_import_graph_has_no_cycles_between_the_top_folders():
    """Module-level imports between the top folders run one way: family folders -> shared machinery; vlmprune (the
    contract) imports nothing from runtime or export; runtime never imports export."""
    edges = set()
    for folder in (*SHARED, "models"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in tree.body:  # module level only: function-local imports are deliberate lazy loads
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "vlmprune" and len(parts) > 1 and parts[1] in (*SHARED, "models"):
                        edges.add((folder, parts[1]))
                    elif parts[0] == "vlmprune" and len(parts) > 1:
                        edges.add((folder, "vlmprune"))
    assert ("vlmprune", "runtime") not in edges and ("vlmprune", "export") not in edges
    assert ("runtime", "export") not in edges


@pytest.fixture()
def copied_family(tmp_path, monkeypatch):
    """``models/llava`` copied to ``llava_copy`` (its dotted names rewritten) and registered as a plugin family for
    the same checkpoints (model_type ``llava``): a later registration wins."""
    dst = tmp_path / "plugins" / "llava_copy"
    shutil.copytree(ROOT / "models" / "llava", dst, ignore=shutil.ignore_patterns("__pycache__"))
    for path in dst.rglob("*.py"):
        text = path.read_text().replace("vlmprune.models.llava.", "llava_copy.")
        text = text.replace('key="llava"', 'key="llava_copy"').replace('name="LLaVA-1.5"', 'name="LLaVA copy"')
        text = text.replace("presets=PRESETS,", "presets=(),")  # the presets stay the real family's
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.setenv(registry.PLUGIN_ENV, "llava_copy")
    registry.reset()
    yield "llava_copy"
    registry.reset()
    for name in [m for m in sys.modules if m == "llava_copy" or m.startswith("llava_copy.")]:
        del sys.modules[name]


@pytest.mark.slow
def test_a_copied_family_works_through_every_command_with_no_change_outside_its_folder(copied_family, tmp_path):
    from vlmprune.export.cli import main as export_main
    from vlmprune.runtime.cli import run_main, viz_main
    from vlmprune.runtime.eval_cli import main as eval_main
    from vlmprune.runtime.eval_demo import make_demo_dataset
    from vlmprune.runtime.pipeline import open_bundle

    bundle = tmp_path / "bundle"
    assert export_main.run(["--model", "tiny-llava", "--method", "fopru", "--keep", "0.25", "--out", str(bundle),
                            "--no-fused-decoder", "--quiet"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["family"] == copied_family
    pipe = open_bundle(bundle)
    assert type(pipe.family).__module__ == "llava_copy.runtime"
    assert run_main.run([str(bundle), "--image", "sample", "--prompt", "What is in the picture?",
                         "--max-new-tokens", "4"]) == 0
    assert viz_main.run([str(bundle), "--image", "sample", "-o", str(tmp_path / "kept.png")]) == 0
    data = make_demo_dataset(tmp_path / "demo", items=2)
    assert eval_main.run([str(bundle), "--data", str(data), "--out", str(tmp_path / "eval"),
                          "--max-new-tokens", "3", "--plain-progress"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["dataset"]["skipped"] == 0 and summary["answers"]["computed"] == 2 * 2  # 2 items x 2 buckets


def test_prune_run_verifies_the_bundle_once(monkeypatch, tmp_path):
    """``prune-run`` opened (and with --verify full, hashed) the bundle three times: for the positions default, to
    pick the pipeline, and in the pipeline."""
    from vlmprune import bundle as bundle_module
    from vlmprune.export.exporter import ExportRequest, export_bundle
    from vlmprune.export.progress import Steps
    from vlmprune.runtime.cli import run_main

    path = export_bundle(ExportRequest(model="tiny-llava", method="fopru", keeps=[0.25], out=tmp_path / "b",
                                       fused_decoder=False, validate=False), Steps(quiet=True)).path
    calls = []
    real = bundle_module.verify_files
    monkeypatch.setattr(bundle_module, "verify_files", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert run_main.run([str(path), "--image", "sample", "--prompt", "What is it?", "--max-new-tokens", "2",
                         "--verify", "full"]) == 0
    assert calls == ["full"]


def test_vision_weights_are_released_for_every_family():
    """The exporter dropped only LLaVA's vision modules; Qwen2.5-VL's vision tower (``model.visual``) stayed in
    memory through the decoder export. Now the family's declared ``vision_modules`` are released."""
    torch = pytest.importorskip("torch")
    from vlmprune.export.exporter import _release_vision
    from vlmprune.models import load_model

    torch.set_grad_enabled(False)
    for preset in ("tiny-qwen2.5-vl", "tiny-llava"):
        adapter = load_model(preset)
        _release_vision(adapter)
        for part in adapter.family.vision_modules:
            assert all(p.numel() == 0 for p in adapter.model.get_submodule(part).parameters()), (preset, part)
        assert any(p.numel() > 0 for p in adapter.language_model().parameters())
