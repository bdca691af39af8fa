"""A new user's first hour with the commands: the base (edge) install names the extra a command needs, --help says
defaults and has help for every option, settings are checked before work starts, --stream --json keeps stdout JSON,
prune-calibrate does not eat small sets silently and keeps its output readable, error hints name the current hub CLI
only for hub ids, and export's summary lines say what they mean."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from PIL import Image

from vlmprune.errors import VlmpruneError
from vlmprune.export.exporter import ExportRequest, _print_validation, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.sample import make_sample_image

BLOCKED = ("torch", "torchvision", "transformers", "onnx", "onnxscript", "onnx_graphsurgeon", "polygraphy",
           "safetensors", "tensorrt", "modelopt", "matplotlib")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("ux") / "fopru"
    return export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=out, validate=False), Steps(quiet=True)).path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for i in range(8):
        rng = np.random.default_rng(i)
        base = np.asarray(make_sample_image(360 + 20 * i, 300))
        noisy = np.clip(base.astype(int) + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i}.png")
    return folder


def _call(entry, argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = entry.run(argv)
    return code, out.getvalue(), err.getvalue()


# --- the base install ----------------------------------------------------------------------------------------------


def test_base_install_names_the_extra_or_works(bundle, images, tmp_path):
    """torch, onnx, matplotlib... made unimportable, as on an edge box with `pip install vlmprune`."""
    from vlmprune.export.trt_build import main as build_main

    full_fp16 = _call(build_main, [str(bundle), "--dry-run"])
    script = textwrap.dedent(f"""
        import io, json, sys
        from contextlib import redirect_stderr, redirect_stdout
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from vlmprune.export.cli import main as export_main
        from vlmprune.export.trt_build import main as build_main
        from vlmprune.export.bench import main as bench_main
        from vlmprune.calibrate.cli import main as calibrate_main
        out = {{}}
        for key, entry, argv in [
            ("export_help", export_main, ["--help"]),
            ("export_typo", export_main, ["--method", "fopu", "--keep", "0.5"]),
            ("export", export_main, ["--method", "fopru", "--keep", "0.5"]),
            ("build_dry", build_main, [{str(bundle)!r}, "--dry-run"]),
            ("build_dry_int8", build_main, [{str(bundle)!r}, "--dry-run", "--precision", "int8", "--target", "trt8.6"]),
            ("calibrate", calibrate_main, [{str(bundle)!r}, "--images", {str(images)!r}]),
            ("bench", bench_main, ["--out", {str(tmp_path / "bench")!r}]),
        ]:
            o, e = io.StringIO(), io.StringIO()
            with redirect_stdout(o), redirect_stderr(e):
                try:
                    code = entry.run(argv)
                except SystemExit as stop:  # --help
                    code = stop.code
            out[key] = [code, o.getvalue(), e.getvalue()]
        out["heavy"] = sorted({{m.split(".")[0] for m in sys.modules}} & set({BLOCKED!r}))
        print("RESULT" + json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line, done.stderr[-3000:]
    res = json.loads(line[len("RESULT"):])
    assert res["heavy"] == []
    # --help reads without torch, and a typo is caught before the extra is even needed
    code, out, err = res["export_help"]
    assert code == 0 and "--method" in out and "fopru" in out and "--list-options" in out, err
    code, _, err = res["export_typo"]
    assert code == 2 and err.strip() == ("prune-export: error: unknown pruning method 'fopu'; did you mean fopru? "
                                         "choose one of: none, fopru, gprune, gridprune, l2norm, pool")
    for key, extra in (("export", "export"), ("calibrate", "calibrate"), ("bench", "export")):
        code, _, err = res[key]
        assert code == 2 and len(err.strip().splitlines()) == 1, (key, err)
        assert f'pip install "vlmprune[{extra}]"' in err and "Traceback" not in err
    assert not (bundle / "int8").exists()  # refused before any work
    # the dry run needs neither onnx nor TensorRT, and prints the same commands (the fp32 pins included)
    assert res["build_dry"][0] == 0 and res["build_dry"][1] == full_fp16[1]
    assert "--layerPrecisions=" in res["build_dry"][1]
    code, out, err = res["build_dry_int8"]
    assert code == 0 and "--calib=" in out and "not exist yet" in err and "prune-calibrate" in err


# --- --help --------------------------------------------------------------------------------------------------------


def _parsers():
    from vlmprune.calibrate.cli import _parser as calibrate
    from vlmprune.export.bench import _parser as bench
    from vlmprune.export.cli import build_parser as export
    from vlmprune.export.trt_build import _parser as build
    from vlmprune.runtime.cli import _run_parser as run
    from vlmprune.runtime.cli import _viz_parser as viz
    from vlmprune.runtime.profile_cli import _parser as profile

    from vlmprune.runtime.eval_cli import _parser as evaluate
    from vlmprune.runtime.verify_cli import _parser as verify

    return {"prune-export": export(), "prune-run": run(), "prune-viz": viz(), "prune-profile": profile(),
            "prune-calibrate": calibrate(), "prune-build": build(), "prune-bench": bench(), "prune-verify": verify(),
            "prune-eval": evaluate()}


def _balanced(text: str) -> bool:
    """Round brackets pair up, once interval notation such as (0, 1] is set aside."""
    import re

    text = re.sub(r"[(\[][-\w.]+, [-\w.]+[)\]]", "", text)
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


@pytest.mark.parametrize("prog", ["prune-export", "prune-run", "prune-viz", "prune-profile", "prune-calibrate",
                                  "prune-build", "prune-bench", "prune-verify", "prune-eval"])
def test_help_has_text_for_every_option_shows_defaults_and_no_rst(prog):
    parser = _parsers()[prog]
    text = parser.format_help()
    assert "``" not in text and "`" not in (parser.description or "")
    assert _balanced(parser.description or ""), f"{prog}: unbalanced parentheses in the description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{prog} {action.option_strings or action.dest} has no help"
        assert _balanced(action.help), f"{prog} {action.option_strings}: unbalanced parentheses in its help"
        shown = action.default not in (None, False, [], argparse.SUPPRESS) and action.nargs != 0
        if shown:  # "default" followed by the value itself, not just the word (it once said "TensorRT's default")
            helped = parser._get_formatter()._expand_help(action).lower()
            value = str(action.default).lower()
            assert "default" in helped and value in helped[helped.index("default"):], \
                f"{prog} {action.option_strings}: default {action.default!r} not shown"
    assert "(default: None)" not in text and "(default: False)" not in text


def test_method_names_are_the_registrys():
    from vlmprune.methods import METHOD_NAMES
    from vlmprune.prune import METHODS

    assert METHOD_NAMES == tuple(METHODS)


def test_help_says_what_users_asked():
    p = _parsers()
    assert "(default: 64)" in p["prune-run"].format_help()
    assert "most pruned bucket" in p["prune-run"].format_help()  # the bucket used without --keep
    assert "named after a bucket" in p["prune-profile"].format_help()  # the --from-log naming rule
    export = p["prune-export"].format_help()
    assert "--list-options" in export and "docs/methods.md" in export and "(default: fp32)" in export


# --- prune-run -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [("--temperature", "-1", "temperature -1.0"),
                                                   ("--top-p", "0", "top-p 0.0"),
                                                   ("--max-new-tokens", "0", "--max-new-tokens 0")])
def test_run_settings_are_checked_before_a_bucket_is_chosen(bundle, flag, value, message):
    from vlmprune.runtime.cli import run_main

    code, out, err = _call(run_main, [str(bundle), "--image", "sample", "--prompt", "hi", flag, value])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err and "using bucket" not in err


def test_stream_with_json_streams_on_stderr_and_keeps_stdout_json(bundle):
    from vlmprune.runtime.cli import run_main

    code, out, err = _call(run_main, [str(bundle), "--image", "sample", "--prompt", "hi", "--stream", "--json",
                                      "--max-new-tokens", "6"])
    assert code == 0
    result = json.loads(out)  # nothing but the JSON object on stdout
    assert result["text"] and result["text"] in err


# --- prune-calibrate -----------------------------------------------------------------------------------------------


def test_calibrate_default_holdout_leaves_most_images_and_says_so(bundle, images, tmp_path):
    from vlmprune.calibrate.cli import main as calibrate_main

    code, out, err = _call(calibrate_main, [str(bundle), "--images", str(images), "--holdout", "8"])
    assert code == 2 and "--holdout 8 leaves no image to calibrate with (8 readable" in err
    assert len(err.strip().split("\n")) <= 2  # the finished progress bar, then the one line
    code, out, err = _call(calibrate_main, [str(bundle), "--images", str(images), "--algo", "minmax"])
    assert code == 0, err
    assert "calibration images: 6; held out for the accuracy report: 2 (default: min(8, a quarter of the 8 found)" in err
    assert "only 6 calibration image(s)" in err
    assert "pre-processing" not in err and "Collecting tensor data" not in out + err  # the quantiser's chatter
    assert out.splitlines()[0].strip().startswith("bucket |")  # stdout: the report table only


# --- error hints ---------------------------------------------------------------------------------------------------


def test_download_hint_names_hf_and_only_for_hub_ids(tmp_path, monkeypatch):
    from vlmprune.models import resolve_path

    with pytest.raises(VlmpruneError) as err:
        resolve_path("nobody/no-such-model")
    assert "`hf download nobody/no-such-model`" in str(err.value) and "huggingface-cli" not in str(err.value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports").mkdir()
    for typo in ("exports/tiny-llava-fopur", str(tmp_path / "nowhere"), "./models/x", "~/llava"):
        with pytest.raises(VlmpruneError) as err:
            resolve_path(typo)
        assert "does not exist" in str(err.value) and "hf download" not in str(err.value), typo


# --- prune-export's summary lines ----------------------------------------------------------------------------------


def test_fp16_validation_prints_the_overlap_that_made_it_pass(capsys):
    checks = [
        {"graph": "vision_fopru_k64.onnx", "case": c, "output": o, "max_abs_diff": d, "allowed": 0.1, "passed": True,
         "index_overlap": ov, "indices_equal": eq}
        for c, o, d, ov, eq in (("sample image", "image_embeds", 5e-3, None, None),
                                ("sample image", "kept_indices", 0.0, 1.0, True),
                                ("random input", "kept_indices", 0.0, 0.993, False))
    ]
    _print_validation({"tolerance": {"min_overlap": 0.9}, "checks": checks}, Steps(stream=sys.stdout))
    line = capsys.readouterr().out
    assert "kept indices identical in 1/2, index overlap min 0.993 (needs >= 0.9)" in line
    _print_validation({"tolerance": {"min_overlap": 1.0}, "checks": checks[:2]}, Steps(stream=sys.stdout))
    assert "overlap" not in capsys.readouterr().out  # fp32 needs identical indices: nothing more to say


def test_export_summary_says_which_tensorrt_needs_its_own_export(tmp_path):
    from vlmprune.export.cli import main as export_main

    code, out, err = _call(export_main, ["--method", "fopru", "--keep", "0.25", "--out", str(tmp_path / "b"),
                                         "--no-validate", "--quiet", "--no-fused-decoder"])
    assert code == 0, err
    assert "FAIL" not in out
    assert "TensorRT lint (exported for --target trt10): loads on trt8.6, trt10, trt11" in out
    assert "TensorRT 8.5 needs its own export with --target trt8.5" in out
