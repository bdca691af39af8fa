"""prune-eval under hostile input (issues 26 and 27): what it reads (only inside the image folder, regular files,
bounded JSON), what it writes (its own marked --out, never through a symbolic link, no torn line on a failed
write, unique temporary names) and when it refuses (foreign folders, FIFOs without hanging, nothing evaluated).
Each case is one line and exit 2, or a correct run. FIFO cases run in a subprocess with a timeout, so the old
behaviour (a hang) fails the test instead of hanging it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.runtime.eval_cli import main as eval_main
from vlmprune.sample import make_sample_image

PROMPT = "What is in the picture?"
BASE = ["--max-new-tokens", "2", "--keep", "0.25"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("evh") / "fopru"
    return export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=out), Steps(quiet=True)).path


def _run(capsys, *args) -> tuple[int, str]:
    code = eval_main.run([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def _folder(tmp_path: Path, name="images", n=1) -> Path:
    images = tmp_path / name
    images.mkdir()
    for i in range(n):
        make_sample_image(320 + 40 * i, 240).save(images / f"{i}.png")
    (images / "prompt.txt").write_text(PROMPT + "\n")
    return images


def _jsonl(path: Path, images: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question_id": n, "image": im, "text": PROMPT}) + "\n"
                            for n, im in enumerate(images)))
    return path


def _subprocess_eval(args: list, timeout: float = 120) -> subprocess.CompletedProcess:
    code = "import sys; from vlmprune.runtime.eval_cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd="/tmp")


# --- issue 27 ------------------------------------------------------------------------------------------------------


def test_out_equal_to_the_image_folder_is_refused(bundle, tmp_path, capsys):
    """The first run's pareto.png used to become an item of the second run."""
    images = _folder(tmp_path)
    before = sorted(os.listdir(images))
    for out in (images, images / "eval"):
        code, err = _run(capsys, bundle, "--data", images, "--out", out, *BASE)
        assert code == 2 and "inside the image folder" in err, err
    assert sorted(os.listdir(images)) == before  # nothing written into it


def test_a_run_that_evaluated_nothing_exits_non_zero(bundle, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "prompt.txt").write_text(PROMPT)
    code, err = _run(capsys, bundle, "--data", images, "--out", tmp_path / "out", *BASE)
    assert code == 2 and "nothing was evaluated: 1 item(s) skipped" in err and "broken.png" in err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_summaries_never_use_a_fixed_temporary_name(bundle, tmp_path, capsys):
    """The fixed names `.summary.json.tmp` / `.pareto.png.tmp` collided between two runs (FileNotFoundError) and,
    being predictable, a symbolic link planted at one was written through. Now each write gets a fresh name."""
    images = _folder(tmp_path)
    out = tmp_path / "out"
    assert _run(capsys, bundle, "--data", images, "--out", out, *BASE)[0] == 0
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    for name in (".summary.json.tmp", ".summary.md.tmp", ".pareto.png.tmp"):
        os.symlink(outside, out / name)
    assert _run(capsys, bundle, "--data", images, "--out", out, *BASE)[0] == 0
    assert outside.read_text() == "keep me\n"
    assert json.loads((out / "summary.json").read_text())["answers"]["reused_from_earlier_runs"] == 2
    leftovers = [n for n in os.listdir(out) if ".part-" in n]
    assert not leftovers


def test_a_failed_append_leaves_no_torn_line(tmp_path):
    """Disk full mid-line: the kernel writes what fits, then fails. RLIMIT_FSIZE gives exactly that (a short write,
    then EFBIG) on a real file. The results file must end with a whole line, as the error message says."""
    path = tmp_path / "results.jsonl"
    script = textwrap.dedent("""
        import resource, signal, sys
        from pathlib import Path
        from vlmprune.runtime.eval_run import ResultLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        path = Path(sys.argv[1])
        log = ResultLog(path, {"max_new_tokens": 2})
        record = lambda n: {"bundle_id": "b", "bucket": "k", "qid": str(n), "item": "i", "text": "x" * 100}
        log.append(record(0))
        limit = path.stat().st_size + 150  # room for part of the next line only
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            log.append(record(1))
        except OSError as exc:
            print("failed", exc.errno)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          cwd="/tmp")
    assert "failed" in done.stdout, done.stderr[-2000:]
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and [json.loads(line)["qid"] for line in raw.splitlines()[1:]] == ["0"]


def test_profile_from_log_on_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "trtexec.log"
    os.mkfifo(fifo)
    code = "import sys; from vlmprune.runtime.profile_cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "--from-log", str(fifo), "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120, cwd="/tmp")
    assert done.returncode == 2 and "is a FIFO" in done.stderr and "Traceback" not in done.stderr, done.stderr


# --- issue 26: what prune-eval reads ---------------------------------------------------------------------------------


def test_images_outside_the_image_folder_are_not_read(bundle, tmp_path, capsys):
    images = _folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    make_sample_image(300, 300).save(outside / "secret.png")
    os.symlink(outside / "secret.png", images / "link.png")
    data = _jsonl(tmp_path / "q.jsonl", ["../outside/secret.png", str(outside / "secret.png"), "link.png"])
    code, err = _run(capsys, bundle, "--data", data, "--images", images, "--out", tmp_path / "o", *BASE)
    assert code == 2 and "no usable items" in err and "3 skipped" in err and "outside the image folder" in err
    # a symbolic link in an image folder is refused the same way; the folder's own image is evaluated
    code, _ = _run(capsys, bundle, "--data", images, "--out", tmp_path / "o2", *BASE)
    rows = [json.loads(line) for line in (tmp_path / "o2" / "results.jsonl").read_text().splitlines()[1:]]
    assert code == 0 and {r["qid"] for r in rows} == {"0.png"}
    # the user may opt in
    code, err = _run(capsys, bundle, "--data", data, "--images", images, "--out", tmp_path / "o3",
                     "--allow-outside-images", *BASE)
    assert code == 0, err
    assert json.loads((tmp_path / "o3" / "summary.json").read_text())["dataset"]["items"] == 3


def test_deeply_nested_json_is_a_bad_line_or_one_error(bundle, tmp_path, capsys):
    images = _folder(tmp_path)
    data = _jsonl(tmp_path / "q.jsonl", ["0.png"])
    deep = "[" * 200_000 + "]" * 200_000
    data.write_text(data.read_text() + deep + "\n")
    code, err = _run(capsys, bundle, "--data", data, "--images", images, "--out", tmp_path / "o", *BASE)
    assert code == 0, err
    skipped = json.loads((tmp_path / "o" / "summary.json").read_text())["dataset"]["skipped_items"]
    assert skipped == [{"where": "q.jsonl line 2", "reason": "not valid JSON (nested too deeply)"}]
    vqa = tmp_path / "questions.json"
    vqa.write_text('{"questions": ' + deep + "}")
    code, err = _run(capsys, bundle, "--data", vqa, "--images", images, "--out", tmp_path / "o4", *BASE)
    assert code == 2 and "is not valid JSON (nested too deeply)" in err


def test_a_fifo_as_data_or_results_file_is_refused_without_hanging(bundle, tmp_path):
    images = _folder(tmp_path)
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    done = _subprocess_eval([bundle, "--data", fifo, "--images", images, "--out", tmp_path / "o", *BASE])
    assert done.returncode == 2 and "data file" in done.stderr and "is a FIFO" in done.stderr, done.stderr[-2000:]
    out = tmp_path / "o2"
    out.mkdir()
    (out / ".prune-eval").write_text("{}")
    os.mkfifo(out / "results.jsonl")
    done = _subprocess_eval([bundle, "--data", images, "--out", out, *BASE])
    assert done.returncode == 2 and "results.jsonl is a FIFO" in done.stderr, done.stderr[-2000:]


def test_a_replaced_image_is_answered_again(bundle, tmp_path, capsys):
    """Resume is keyed by the image's content: the same names holding other pictures are new items."""
    images = _folder(tmp_path, n=2)
    out = tmp_path / "o"
    assert _run(capsys, bundle, "--data", images, "--out", out, *BASE)[0] == 0
    assert _run(capsys, bundle, "--data", images, "--out", out, *BASE)[0] == 0
    assert json.loads((out / "summary.json").read_text())["answers"]["reused_from_earlier_runs"] == 4
    for i in range(2):
        make_sample_image(200, 500 + i).save(images / f"{i}.png")
    assert _run(capsys, bundle, "--data", images, "--out", out, *BASE)[0] == 0
    answers = json.loads((out / "summary.json").read_text())["answers"]
    assert answers == {"computed": 4, "reused_from_earlier_runs": 0}


# --- issue 26: what prune-eval writes --------------------------------------------------------------------------------


def test_a_foreign_out_folder_is_refused_and_left_alone(bundle, tmp_path, capsys):
    images = _folder(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    files = {"summary.json": "{}", "summary.md": "notes", "pareto.png": "not a png", "notes.txt": "x"}
    for name, text in files.items():
        (out / name).write_text(text)
    code, err = _run(capsys, bundle, "--data", images, "--out", out, *BASE)
    assert code == 2 and "holds files prune-eval did not write" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_out_that_is_a_file_or_holds_a_folder_or_link_is_one_line(bundle, tmp_path, capsys):
    images = _folder(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = _run(capsys, bundle, "--data", images, "--out", afile, *BASE)
    assert code == 2 and "is a file, not a folder" in err and afile.read_text() == "x"
    out = tmp_path / "o"
    assert _run(capsys, bundle, "--data", images, "--out", out, *BASE)[0] == 0
    (out / "results.jsonl").unlink()
    (out / "results.jsonl").mkdir()
    code, err = _run(capsys, bundle, "--data", images, "--out", out, *BASE)
    assert code == 2 and "results.jsonl is a folder" in err
    (out / "results.jsonl").rmdir()
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    os.symlink(outside, out / "results.jsonl")
    code, err = _run(capsys, bundle, "--data", images, "--out", out, *BASE)
    assert code == 2 and "results.jsonl is a symbolic link" in err and outside.read_text() == ""


# --- issue 26: PrunedVLM, the API harnesses call ----------------------------------------------------------------------


def test_pruned_vlm_arguments_are_one_value_error_naming_the_argument(bundle, tmp_path):
    """Each bad argument used to be a bare TypeError, AttributeError or OSError from inside the pipeline."""
    import io

    import numpy as np
    from PIL import Image

    from vlmprune.errors import VlmpruneError
    from vlmprune.runtime.api import PrunedVLM

    def refused(match, call):
        with pytest.raises(VlmpruneError, match=match) as info:
            call()
        assert isinstance(info.value, ValueError)

    refused("keep must be a number", lambda: PrunedVLM(bundle, keep="0.25"))
    refused("max_new_tokens must be an integer", lambda: PrunedVLM(bundle, max_new_tokens="5"))
    refused("unknown option 'kep'", lambda: PrunedVLM(bundle, kep=0.25))
    vlm = PrunedVLM(bundle, keep=0.25, max_new_tokens=2)
    picture = make_sample_image(320, 240)
    refused("image must be a path, a PIL image or a numpy array, got NoneType", lambda: vlm.generate(None, PROMPT))
    refused("prompt must be a string", lambda: vlm.generate(picture, 42))
    refused("max_new_tokens must be an integer", lambda: vlm.generate(picture, PROMPT, max_new_tokens="3"))
    refused("unknown option 'beams'", lambda: vlm.generate(picture, PROMPT, beams=4))
    refused("message must be a list", lambda: vlm.generate_message("photo.png"))
    refused("message part 0 is a str, not a dict", lambda: vlm.generate_message(["photo.png"]))
    refused("message part 1 is text whose value is a int",
            lambda: vlm.generate_message([{"type": "image", "value": picture}, {"type": "text", "value": 3}]))
    png = io.BytesIO()
    picture.save(png, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    refused("image cannot be decoded", lambda: vlm.generate(Image.open(truncated), PROMPT))
    refused("image array has shape", lambda: vlm.generate(np.zeros((4, 5, 6, 7), np.uint8), PROMPT))
    refused("NaN or inf", lambda: vlm.generate(np.full((8, 8, 3), np.nan, np.float32), PROMPT))
    # numpy arrays are accepted as transformers' processors take them: HWC uint8, CHW, floats in 0-1
    hwc = np.asarray(picture)
    expected = vlm.generate(picture, PROMPT)
    assert vlm.generate(hwc, PROMPT) == expected
    assert vlm.generate(np.moveaxis(hwc, -1, 0), PROMPT) == expected
    assert vlm.generate(hwc.astype(np.float32) / 255.0, PROMPT) == expected
