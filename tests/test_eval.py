"""prune-eval: the VQA metrics against the published rules, the three data readers, an end-to-end run on the tiny
preset (random weights: agreement measures exactly agreement), resume after a kill (nothing recomputed, the same
result), malformed data counted as skipped, and the Python entry."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

import vqa_reference

from preset_geometry import preset_tokens, spec_k
from vlmprune.errors import VlmpruneError
from vlmprune.runtime.api import PrunedVLM
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.runtime.eval_cli import main as eval_main
from vlmprune.runtime.eval_data import load_dataset
from vlmprune.runtime.eval_demo import make_demo_dataset
from vlmprune.runtime.eval_metrics import (VQA_CONVENTIONS, agreement, common_prefix, exact_match, normalize_answer,
                                           token_f1, vqa_accuracy)
from vlmprune.runtime.eval_progress import LineProgress
from vlmprune.runtime.pipeline import Pipeline

TOKENS = "3"  # --max-new-tokens: short answers keep the runs fast
N, _ = preset_tokens(ExportRequest.model)  # the bundle's preset (prune-export's default model)
K = {keep: spec_k(keep, N) for keep in (0.25, 0.5)}
NONE = f"none-k{N}"  # the unpruned bucket


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "fopru"
    return export_bundle(ExportRequest(method="fopru", keeps=[0.25, 0.5], out=out), Steps(quiet=True)).path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("evdata"), items=4)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _answers(out: Path) -> dict:
    """The answers of a results file by (bundle, bucket, question), without the timings."""
    return {(r["bundle_id"], r["bucket"], r["qid"]): (r["text"], r["token_ids"], r["first_token"], r["stop_reason"])
            for r in _lines(out / "results.jsonl")[1:]}


def _quality(out: Path) -> list[dict]:
    rows = json.loads((out / "summary.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "ttft_ms"} for r in rows]


# --- metrics ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, normal", [
    ("Two dogs.", "2 dogs"), ("the cat", "cat"), ("An apple ", "apple"), ("dont", "don't"), ("Yes!", "yes"),
    ("1,000 people", "1000 people"), ("3.5", "3.5"), ("black/white", "black white"), ("red, white", "red white"),
    ("None", "0"), ("it's a\tdog\n", "it's dog"),
])
def test_vqa_normalisation_follows_the_official_rules(raw, normal):
    assert normalize_answer(raw) == normal


def test_vqa_accuracy_is_the_leave_one_out_average():
    refs = lambda n: ["2"] * n + ["many"] * (10 - n)  # noqa: E731
    # each of the ten subsets of nine scores min(1, matches / 3)
    for convention in VQA_CONVENTIONS:
        assert vqa_accuracy("two", refs(4), convention) == 1.0
        assert vqa_accuracy("2", refs(3), convention) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
        assert vqa_accuracy("2", refs(2), convention) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
        assert vqa_accuracy("2", refs(1), convention) == pytest.approx(9 * (1 / 3) / 10)
        assert vqa_accuracy("3", refs(4), convention) == 0.0
        # one reference: no other annotator to agree with (vqaEval.py:106, utils.py:38), so 0 even on a match
        assert vqa_accuracy("The Blue.", ["blue"], convention) == 0.0


# Where the references' rules bite: unanimous references (vqaEval.py:98 normalises only when they differ), a
# single reference, more than 32 periods (the re.UNICODE flag passed as count), "1,,2" (lmms-eval's \d,+\d
# against the official \d,\d), punctuation touching a space, and ordinary answers.
VQA_CASES = [
    ("Yes", ["yes"] * 10), ("yes", ["yes"] * 10), ("Two", ["2"] * 10), ("two", ["two"] * 10),
    ("The Blue.", ["blue"]), ("blue", ["blue"]), ("yes", ["yes", "yes"]),
    ("yes" + "." * 40, ["yes"] * 5 + ["no"] * 5), ("no" + ". " * 35, ["no", "No", "no ", "nope"]),
    ("1,,2 a/b", ["1,,2 a/b", "12 b", "1 2 b", "x"]), ("1,,2 a/b", ["12 b"] * 3 + ["1 2 b"] * 3),
    ("red, white", ["red white"] * 4 + ["red"]), ("black/white", ["black white"] * 3 + ["gray"] * 7),
    ("1,000", ["1000"] * 3 + ["1,000"] * 3), ("3.5", ["3.5", "3 5", "35"]), ("it's a\tdog\n", ["it's dog", "dog"]),
    ("Dont know", ["don't know"] * 3 + ["dont know"]), ("  None ", ["0", "zero", "none", "1"]),
    ("(a) cat!", ["cat"] * 6 + ["a cat"] * 4), ("2 dogs", ["Two dogs."] * 10),
]


@pytest.mark.parametrize("prediction, answers", VQA_CASES)
def test_vqa_accuracy_matches_transcriptions_of_both_references(prediction, answers):
    """Checked against tests/vqa_reference.py: lmms-eval's vqav2_process_results (the papers' numbers) and the
    official vqaEval.py (file and lines cited there)."""
    assert vqa_accuracy(prediction, answers) == pytest.approx(vqa_reference.lmms_eval(prediction, answers))
    assert vqa_accuracy(prediction, answers, "lmms-eval") == pytest.approx(vqa_reference.lmms_eval(prediction,
                                                                                                   answers))
    assert vqa_accuracy(prediction, answers, "vqaeval") == pytest.approx(vqa_reference.official(prediction, answers))


def test_vqa_conventions_differ_where_the_references_do():
    assert vqa_accuracy("Yes", ["yes"] * 10, "lmms-eval") == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10, "vqaeval") == 0.0  # unanimous references: no normalisation
    assert normalize_answer("1,,2 a/b", "lmms-eval") == "12 ab"
    assert normalize_answer("1,,2 a/b", "vqaeval") == "1 2 b"
    assert normalize_answer("no" + "." * 40) == "no" + "." * 8  # at most 32 periods go
    with pytest.raises(ValueError, match="unknown VQA convention"):
        vqa_accuracy("yes", ["yes"], "coco")


def test_vqa_accuracy_matches_the_transcriptions_on_generated_answers():
    """Seeded answers built from the tokens the rules treat specially, against both transcriptions."""
    import random

    rng = random.Random(22)
    tokens = ["a", "the", "An", "two", "None", "dont", "yes", "Yes.", "1,000", "1,,2", "3.5", "black/white",
              "red,", ", blue", "(x)", "!", "?", "it's", "..", "\t", " "]
    make = lambda: " ".join(rng.choice(tokens) for _ in range(rng.randint(1, 4)))  # noqa: E731
    for _ in range(400):
        pool = [make() for _ in range(3)]
        answers = [rng.choice(pool) for _ in range(rng.choice([1, 2, 3, 10]))]
        prediction = rng.choice(pool + [make()])
        assert vqa_accuracy(prediction, answers) == pytest.approx(vqa_reference.lmms_eval(prediction, answers))
        assert vqa_accuracy(prediction, answers, "vqaeval") == pytest.approx(vqa_reference.official(prediction,
                                                                                                    answers))


def test_exact_match_uses_the_most_frequent_reference():
    assert exact_match(" Blue. ", ["blue"]) == 1.0
    assert exact_match("a blue car", ["blue"]) == 0.0  # VQA accuracy would drop the article; exact match does not
    assert exact_match("red", ["blue", "red", "red"]) == 1.0 and exact_match("blue", ["blue", "red", "red"]) == 0.0


def test_agreement_metrics():
    assert token_f1([1, 2, 3], [3, 2, 1]) == 1.0 and common_prefix([1, 2, 3], [3, 2, 1]) == 0.0
    assert token_f1([1, 2], [1, 2, 3, 4]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert common_prefix([1, 2, 9, 9], [1, 2, 3]) == 0.5
    assert token_f1([], []) == common_prefix([], []) == 1.0 and token_f1([], [5]) == 0.0
    a = {"token_ids": [5, 6], "first_token": 5}
    b = {"token_ids": [5, 7], "first_token": 5}
    eos_now = {"token_ids": [], "first_token": 2}
    assert agreement(a, b)["first_token"] == 1.0 and agreement(a, b)["identical_answer"] == 0.0
    assert agreement(a, a)["identical_answer"] == 1.0
    assert agreement(eos_now, a)["first_token"] == 0.0


def test_plain_progress_line_has_an_eta(capsys):
    import io

    stream = io.StringIO()
    bar = LineProgress(4, "prune-eval", "answer", stream=stream, every=0.0)
    bar.update(1)
    bar.update(3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("prune-eval: 1/4 (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("prune-eval: 4/4 (100%)") and lines[-1].endswith("ETA 00:00")


# --- readers ---------------------------------------------------------------------------------------------------------


def test_llava_jsonl_reader_skips_bad_lines_one_reason_each(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")  # existence is checked here; decoding at run time
    lines = [
        {"question_id": 1, "image": "a.png", "text": "Q1", "answer": "yes"},
        "{not json",
        {"question_id": 2, "image": "a.png"},
        {"question_id": 3, "image": "missing.png", "text": "Q3"},
        {"question_id": 1, "image": "a.png", "text": "again"},
        [1, 2],
        {"question_id": 4, "image": "a.png", "text": "Q4", "answers": [{"answer": "2"}, {"answer": "two"}, "2"]},
        {"question_id": "x", "image": "a.png", "text": "Q5", "answers": [3]},
        "",
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    ds = load_dataset(path)
    assert [i.qid for i in ds.items] == ["1", "4"]
    assert ds.items[0].answers == ("yes",) and ds.items[1].answers == ("2", "two", "2")
    reasons = {s["where"]: s["reason"] for s in ds.skipped}
    assert reasons == {
        "q.jsonl line 2": reasons["q.jsonl line 2"], "q.jsonl line 3": "no 'text'",
        "q.jsonl line 4": f"image {tmp_path / 'missing.png'} not found",
        "q.jsonl line 5": "question_id 1 repeats an earlier line", "q.jsonl line 6": "a JSON list, not an object",
        "q.jsonl line 8": "an answer is int, not a string or {'answer': ...}",
    }
    assert reasons["q.jsonl line 2"].startswith("not valid JSON")
    assert [i.qid for i in load_dataset(path, limit=1).items] == ["1"]
    assert load_dataset(path, prompt_suffix="Answer briefly.").items[0].prompt == "Q1\nAnswer briefly."


def test_vqav2_pair_and_image_folder(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "COCO_val2014_000000000042.jpg")
    Image.new("RGB", (8, 8)).save(images / "7.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 420, "image_id": 42, "question": "What?"},
        {"question_id": 70, "image_id": 7, "question": "Where?"},
        {"question_id": 90, "image_id": 9, "question": "Who?"},
        {"question_id": 91, "question": "no image id"},
    ]}
    annotations = {"annotations": [
        {"question_id": 420, "answers": [{"answer": "dog", "answer_id": i} for i in range(10)]},
        {"question_id": 70, "answers": [{"answer": "park"}]},
        {"question_id": 90, "answers": [{"answer": "me"}]},
    ]}
    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    ds = load_dataset(q, annotations=a, images=images)
    assert [(i.qid, i.image.name, len(i.answers)) for i in ds.items] == [
        ("420", "COCO_val2014_000000000042.jpg", 10), ("70", "7.jpg", 1)]
    assert len(ds.skipped) == 2 and "image_id 9 not found" in ds.skipped[0]["reason"]
    assert load_dataset(q, images=images).items[0].answers == ()  # questions alone: unlabelled
    with pytest.raises(VlmpruneError, match="is a VQAv2 annotations file"):
        load_dataset(a, images=images)

    (images / "prompt.txt").write_text("Describe the image.\n")
    ds = load_dataset(images)
    assert ds.kind == "folder" and [i.qid for i in ds.items] == ["7.jpg", "COCO_val2014_000000000042.jpg"]
    assert {i.prompt for i in ds.items} == {"Describe the image."} and not ds.has_references
    (images / "other.txt").write_text("x")
    with pytest.raises(VlmpruneError, match="2 .txt files"):
        load_dataset(images)
    assert len(load_dataset(images, prompt_file=images / "prompt.txt").items) == 2


# --- end to end ------------------------------------------------------------------------------------------------------


def test_prune_eval_writes_results_table_and_plot(bundle, data, tmp_path, capsys):
    # Give item 0 the unpruned bucket's own answer as its reference: exact match must then find it.
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    unpruned = Pipeline(bundle).generate(data.parent / lines[0]["image"], lines[0]["text"], keep=1.0,
                                         max_new_tokens=int(TOKENS))
    lines[0]["answer"] = unpruned.text + "."
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    code = eval_main.run([str(bundle), "--data", str(labelled), "--images", str(data.parent), "--out", str(out),
                          "--max-new-tokens", TOKENS])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    results = _lines(out / "results.jsonl")
    # positions None: the bundle's own (as prune-run)
    assert results[0] == {"prune_eval_results": 1,
                          "settings": {"max_new_tokens": 3, "positions": None, "engines": None}}
    assert len(results) == 1 + 4 * 3  # 4 items x (none, 0.5, 0.25)
    report = json.loads((out / "summary.json").read_text())
    rows = {r["bucket"]: r for r in report["rows"]}
    assert list(rows) == [NONE, f"fopru-k{K[0.5]}", f"fopru-k{K[0.25]}"]
    by = {(r["bucket"], r["qid"]): r for r in results[1:]}
    ref = next(r for r in results[1:] if r["bucket"] == NONE and r["qid"] == "0")
    assert ref["token_ids"] == unpruned.token_ids
    for name, row in rows.items():
        recs = [by[(name, q)] for q in "0123"]
        nones = [by[(NONE, q)] for q in "0123"]
        assert row["items"] == row["labelled"] == 4
        assert row["identical_answer"] == sum(r["token_ids"] == n["token_ids"] for r, n in zip(recs, nones)) / 4
        assert row["first_token"] == sum(r["first_token"] == n["first_token"] for r, n in zip(recs, nones)) / 4
        assert row["ttft_ms"] == statistics.median(r["ttft_ms"] for r in recs) > 0
        answers = [line["answer"] for line in lines]
        light = lambda t: t.strip().rstrip(".").strip().lower()  # noqa: E731
        assert row["exact_match"] == sum(light(r["text"]) == light(a) for r, a in zip(recs, answers)) / 4
    assert rows[NONE]["identical_answer"] == rows[NONE]["first_token"] == 1.0
    assert rows[NONE]["exact_match"] >= 0.25  # item 0 at least
    # one reference per item: VQA accuracy has no other annotator to agree with (both references score 0), and the
    # run says so rather than leaving a silent 0
    assert report["settings"]["vqa_convention"] == "lmms-eval" and "lmms-eval" in report["metrics"]["vqa_accuracy"]
    assert all(row["vqa_accuracy"] == 0.0 for row in rows.values())
    assert "4 item(s) have a single reference answer; VQA accuracy scores them 0" in captured.err
    table = (out / "summary.md").read_text()
    assert f"| fopru | 0.25 | {K[0.25]} | 4 |" in table and "VQA acc" in table and table in captured.out
    png = Image.open(out / "pareto.png")
    assert png.size[0] > 1000 and png.size[1] > 300
    # a second run resumes everything: no new answers, the same summary
    before = (out / "results.jsonl").read_bytes()
    assert eval_main.run([str(bundle), "--data", str(labelled), "--images", str(data.parent), "--out", str(out),
                          "--max-new-tokens", TOKENS]) == 0
    assert (out / "results.jsonl").read_bytes() == before
    assert "0 answers computed, 12 reused" in capsys.readouterr().out
    # the other convention rescoring the same stored answers: nothing recomputed, the convention recorded
    assert eval_main.run([str(bundle), "--data", str(labelled), "--images", str(data.parent), "--out", str(out),
                          "--max-new-tokens", TOKENS, "--vqa-convention", "vqaeval"]) == 0
    assert (out / "results.jsonl").read_bytes() == before
    report = json.loads((out / "summary.json").read_text())
    assert report["settings"]["vqa_convention"] == "vqaeval" and "vqaEval.py" in report["metrics"]["vqa_accuracy"]


def _count_generate(monkeypatch) -> list:
    calls = []
    original = Pipeline.generate

    def counted(self, image, prompt, **kw):
        if kw.get("max_new_tokens") != 1:  # 1 = the per-bucket warm-up, never recorded
            calls.append((kw["bucket"]["name"], prompt))
        return original(self, image, prompt, **kw)

    monkeypatch.setattr(Pipeline, "generate", counted)
    return calls


def test_resume_after_a_kill_recomputes_nothing_and_gives_the_same_result(bundle, data, tmp_path, monkeypatch):
    args = [str(bundle), "--data", str(data), "--max-new-tokens", TOKENS, "--plain-progress"]
    # A real kill (SIGKILL: no cleanup runs) after the third answer is on disk, in a process that cannot import
    # torch or transformers: prune-eval is as torch-free as the runtime.
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "torchvision"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from vlmprune.runtime import eval_run
        from vlmprune.runtime.eval_cli import main
        append, count = eval_run.ResultLog.append, [0]
        def dying_append(self, record):
            append(self, record)
            count[0] += 1
            if count[0] == 3:
                assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
                os.kill(os.getpid(), signal.SIGKILL)
        eval_run.ResultLog.append = dying_append
        sys.exit(main.run({args + ["--out", str(killed)]!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    kept = (killed / "results.jsonl").read_bytes()
    assert len(kept.splitlines()) == 1 + 3
    # and the process died again mid-write: a torn last line
    with open(killed / "results.jsonl", "ab") as f:
        f.write(b'{"bundle_id":"0123","bucket":"none-k5')

    calls = _count_generate(monkeypatch)
    assert eval_main.run(args + ["--out", str(killed)]) == 0
    assert len(calls) == 4 * 3 - 3  # only what the killed run had not stored
    resumed = (killed / "results.jsonl").read_bytes()
    assert resumed.startswith(kept) and len(resumed.splitlines()) == 1 + 12  # append-only; torn line gone

    calls.clear()
    clean = tmp_path / "clean"
    assert eval_main.run(args + ["--out", str(clean)]) == 0
    assert len(calls) == 12
    assert _answers(killed) == _answers(clean)
    assert _quality(killed) == _quality(clean)


def test_ctrl_c_keeps_the_answers_and_says_how_to_resume(bundle, data, tmp_path, monkeypatch, capsys):
    args = [str(bundle), "--data", str(data), "--max-new-tokens", TOKENS, "--keep", "0.25", "--out",
            str(tmp_path / "o")]
    original = Pipeline.generate
    seen = []

    def interrupted(self, image, prompt, **kw):
        if kw.get("max_new_tokens") != 1:
            seen.append(1)
            if len(seen) == 4:
                raise KeyboardInterrupt
        return original(self, image, prompt, **kw)

    monkeypatch.setattr(Pipeline, "generate", interrupted)
    assert eval_main.run(args) == 130
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "prune-eval: interrupted" in err
    assert len(_lines(tmp_path / "o" / "results.jsonl")) == 1 + 3
    calls = _count_generate(monkeypatch)
    assert eval_main.run(args) == 0
    assert len(calls) == 4 * 2 - 3  # --keep 0.25: the unpruned bucket and the 0.25 one
    rows = json.loads((tmp_path / "o" / "summary.json").read_text())["rows"]
    assert [r["bucket"] for r in rows] == [NONE, f"fopru-k{K[0.25]}"] and all(r["items"] == 4 for r in rows)


def test_malformed_data_is_skipped_with_one_line_each(bundle, data, tmp_path, capsys):
    images = data.parent
    (images / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    good = [json.loads(line) for line in data.read_text().splitlines()][:2]
    rows = [
        json.dumps(good[0]),
        '{"question_id": 10, "image": "images/scene_0000.png", "text": ',
        json.dumps({"question_id": 11, "image": "images/scene_0000.png"}),
        json.dumps({"question_id": 12, "image": "images/nope.png", "text": "What?"}),
        json.dumps({"question_id": 13, "image": "images/corrupt.png", "text": "What?"}),
        json.dumps(good[1]),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert eval_main.run([str(bundle), "--data", str(path), "--images", str(images), "--out", str(out),
                          "--max-new-tokens", TOKENS, "--keep", "0.5", "--plain-progress"]) == 0
    err = capsys.readouterr().err.splitlines()
    skips = [line for line in err if "skipped" in line and line.startswith("prune-eval: skipped")]
    assert len(skips) == 4, err
    assert any("bad.jsonl line 2: not valid JSON" in s for s in skips)
    assert any("bad.jsonl line 3: no 'text'" in s for s in skips)
    assert any("bad.jsonl line 4: image" in s and "nope.png not found" in s for s in skips)
    assert any("question 13: cannot read image" in s for s in skips)
    report = json.loads((out / "summary.json").read_text())
    assert report["dataset"]["skipped"] == 4 and len(report["dataset"]["skipped_items"]) == 4
    assert {r["items"] for r in report["rows"]} == {2}
    # nothing answerable at all: a non-zero exit saying so (issue 27), never "matplotlib is not installed"
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("\n".join(rows[2:5]) + "\n")
    capsys.readouterr()
    assert eval_main.run([str(bundle), "--data", str(only_bad), "--images", str(images), "--out",
                          str(tmp_path / "out2"), "--max-new-tokens", TOKENS, "--keep", "0.5"]) == 2
    captured = capsys.readouterr()
    assert "nothing was evaluated" in captured.err and "matplotlib" not in captured.out + captured.err


def test_user_errors_are_one_line_and_exit_2(bundle, data, tmp_path, capsys):
    def run(*args):
        code = eval_main.run([str(a) for a in args])
        err = capsys.readouterr().err.strip().splitlines()
        return code, err[-1] if err else ""

    base = ["--max-new-tokens", TOKENS]
    code, err = run(bundle, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "o", *base)
    assert code == 2 and "data" in err and "does not exist" in err
    code, err = run(tmp_path / "nobundle", "--data", data, "--out", tmp_path / "o", *base)
    assert code == 2 and "does not exist" in err
    code, err = run(bundle, "--data", data, "--out", tmp_path / "o", "--keep", "1.5", *base)
    assert code == 2 and "outside (0, 1]" in err
    bad = tmp_path / "allbad.jsonl"
    bad.write_text("nope\n")
    code, err = run(bundle, "--data", bad, "--out", tmp_path / "o", *base)
    assert code == 2 and "no usable items" in err and "line 1: not valid JSON" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.jsonl").write_text("my own notes\n")
    code, err = run(bundle, "--data", data, "--out", foreign, "--limit", "1", *base)
    assert code == 2 and "holds files prune-eval did not write (results.jsonl)" in err  # not its --out
    assert (foreign / "results.jsonl").read_text() == "my own notes\n"  # never overwritten
    (foreign / ".prune-eval").write_text("{}")  # marked as prune-eval's, yet the results file is not its own
    code, err = run(bundle, "--data", data, "--out", foreign, "--limit", "1", *base)
    assert code == 2 and "not a prune-eval results file" in err
    assert (foreign / "results.jsonl").read_text() == "my own notes\n"
    other = tmp_path / "other"
    assert run(bundle, "--data", data, "--out", other, "--limit", "1", *base)[0] == 0
    code, err = run(bundle, "--data", data, "--out", other, "--limit", "1", "--max-new-tokens", "5")
    assert code == 2 and "max-new-tokens 3 (this run: 5)" in err


def test_python_entry_for_evaluation_harnesses(bundle, data):
    image = data.parent / "images" / "scene_0001.png"
    vlm = PrunedVLM(bundle, keep=0.25, max_new_tokens=5)
    text = vlm.generate(str(image), "What color is the house?")
    expected = Pipeline(bundle).generate(image, "What color is the house?", keep=0.25, max_new_tokens=5)
    assert text == expected.text and vlm.last.token_ids == expected.token_ids and vlm.keep == 0.25
    assert vlm.last.visual_tokens_kept == K[0.25] and vlm.last.timings.ttft_ms > 0
    message = [{"type": "image", "value": str(image)}, {"type": "text", "value": "What color is the house?"}]
    assert vlm.generate_message(message) == text
    assert vlm(Image.open(image), "What color is the house?") == text
    with pytest.raises(VlmpruneError, match="holds 0 images"):
        vlm.generate_message(message[1:])
