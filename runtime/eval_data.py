"""The three dataset layouts ``prune-eval`` reads, as one list of items (question id, image path, prompt, optional
reference answers).

- LLaVA's evaluation JSONL (``llava/eval/model_vqa_loader.py`` input): one object per line with ``question_id``,
  ``image`` (relative to ``--images``, default the file's folder), ``text``, and optionally ``answer`` (a string)
  or ``answers`` (strings, or VQAv2-style ``{"answer": ...}`` objects).
- A VQAv2-style pair: ``--data`` the questions JSON (``{"questions": [{question_id, image_id, question}]}``) and
  ``--annotations`` the annotations JSON (``{"annotations": [{question_id, answers: [{answer}]}]}``); images are
  found as COCO names (``COCO_val2014_000000000042.jpg``) or by bare id in ``--images``.
- A folder of images with one prompt file (``--prompt-file``, or the folder's only ``.txt`` file); no references.

A bad line or a missing image never stops the run: it becomes one line in ``skipped`` (where, why) and the rest is
evaluated. Only a dataset that cannot be read at all is an error.

The data is untrusted input: the data, annotations and prompt files must be regular files (a FIFO is refused, not
waited on) of bounded size, JSON nested too deep is a bad line, and every image must resolve (symbolic links
followed) inside the image folder unless the caller allows outside images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vlmprune.errors import VlmpruneError
from vlmprune.safe_read import loads_bounded, read_regular

MAX_DATA_BYTES = 1 << 30  # VQAv2's largest file (train annotations) is about 0.3 GB
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class Item:
    qid: str
    image: Path
    prompt: str
    answers: tuple[str, ...] = ()  # reference answers; empty when the data has none

    @functools.cached_property  # computed once per item: the resume check asks for it per bucket
    def fingerprint(self) -> str:
        """What the generated answer depends on: the image's content (its bytes, not its path: a picture replaced
        under the same name is a new item) and the prompt. A stored result is reused only for the same pair, so
        editing the data never serves a stale answer. References are not part of it: they are scored at summary
        time. An image that cannot be read gets a key no result has; reading it again reports why."""
        digest = hashlib.sha256()
        try:
            with open(self.image, "rb", buffering=0) as f:  # only regular files reach an Item (checked on load)
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            return "unreadable"
        key = json.dumps([digest.hexdigest(), self.prompt])
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Dataset:
    kind: str
    source: str
    items: list[Item] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"where": ..., "reason": ...}

    @property
    def has_references(self) -> bool:
        return any(item.answers for item in self.items)

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append({"where": where, "reason": reason})


def load_dataset(data: str | Path, *, annotations: str | Path | None = None, images: str | Path | None = None,
                 prompt_file: str | Path | None = None, prompt_suffix: str | None = None,
                 limit: int | None = None, allow_outside_images: bool = False) -> Dataset:
    """Read one of the three layouts (chosen by what ``data`` is). ``limit`` keeps the first N readable items;
    ``prompt_suffix`` is appended to every prompt on a new line (LLaVA's short-answer instruction, for example);
    ``allow_outside_images`` lets images resolve outside the image folder."""
    data = Path(data)
    if limit is not None and limit < 1:
        raise VlmpruneError(f"--limit {limit} must be at least 1", "give a positive number of items")
    if not data.exists():
        raise VlmpruneError(f"data {data} does not exist", "pass --data a LLaVA .jsonl, a VQAv2 questions .json or "
                                                           "a folder of images")
    if annotations is not None and not Path(annotations).exists():
        raise VlmpruneError(f"annotations {annotations} does not exist", "pass the VQAv2 annotations JSON file")
    if data.is_dir():
        if annotations is not None:
            raise VlmpruneError("--annotations goes with a VQAv2 questions file, not a folder of images",
                                "drop --annotations or pass the questions JSON as --data")
        ds = _folder(data, Path(prompt_file) if prompt_file else None, limit, allow_outside_images)
    elif data.suffix.lower() == ".jsonl":
        ds = _llava_jsonl(data, Path(images) if images else data.parent, limit, allow_outside_images)
    elif data.suffix.lower() == ".json":
        ds = _vqav2(data, Path(annotations) if annotations else None, Path(images) if images else data.parent, limit,
                    allow_outside_images)
    else:
        raise VlmpruneError(f"cannot tell the format of {data}",
                            "pass a LLaVA .jsonl, a VQAv2 questions .json (with --annotations) or a folder of images")
    if prompt_file is not None and ds.kind != "folder":
        raise VlmpruneError("--prompt-file goes with a folder of images", "the prompts come from the data file here")
    if prompt_suffix:
        ds.items = [Item(i.qid, i.image, f"{i.prompt}\n{prompt_suffix}", i.answers) for i in ds.items]
    if not ds.items:
        first = ds.skipped[0] if ds.skipped else None
        why = f"; {len(ds.skipped)} skipped, first: {first['where']}: {first['reason']}" if first else ""
        raise VlmpruneError(f"no usable items in {data}{why}", "check the file against the formats in `prune-eval -h`")
    return ds


def _image_dir(images: Path) -> None:
    if not images.is_dir():
        raise VlmpruneError(f"image folder {images} does not exist", "pass --images DIR holding the dataset's images")


def _outside(path: Path, images: Path, allow: bool) -> str | None:
    """Why ``path`` may not be read (it resolves, links followed, outside ``images``), or None. A regular file
    is required too: a FIFO would block the reader."""
    try:
        real = Path(os.path.realpath(path))
    except (ValueError, OSError):  # a NUL byte, a link loop
        return f"image {str(path)[:200]!r} is not a usable path"
    if not allow and Path(os.path.realpath(images)) not in real.parents:
        return (f"image {path} resolves outside the image folder {images} (pass --allow-outside-images to read "
                "images elsewhere)")
    if not real.is_file():
        return f"image {path} not found" if not os.path.lexists(path) else f"image {path} is not a regular file"
    return None


def _text(path: Path, what: str) -> str:
    return read_regular(path, what, MAX_DATA_BYTES).decode("utf-8", errors="replace")


def _answers(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        out = []
        for a in value:
            if isinstance(a, dict) and isinstance(a.get("answer"), str):
                out.append(a["answer"])
            elif isinstance(a, str):
                out.append(a)
            else:
                raise ValueError(f"an answer is {type(a).__name__}, not a string or {{'answer': ...}}")
        return tuple(out)
    raise ValueError(f"answers are {type(value).__name__}, not a string or a list")


def _llava_jsonl(path: Path, images: Path, limit: int | None, allow_outside: bool = False) -> Dataset:
    _image_dir(images)
    ds = Dataset("llava-jsonl", str(path))
    seen: set[str] = set()
    for lineno, line in enumerate(_text(path, "data file").split("\n"), 1):
        if limit is not None and len(ds.items) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path.name} line {lineno}"
        try:
            obj = loads_bounded(line)
        except json.JSONDecodeError as exc:
            ds.skip(where, f"not valid JSON ({exc.msg})")
            continue
        except ValueError as exc:
            ds.skip(where, f"not valid JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            ds.skip(where, f"a JSON {type(obj).__name__}, not an object")
            continue
        missing = [k for k in ("question_id", "image", "text") if k not in obj]
        if missing:
            ds.skip(where, f"no {', '.join(repr(k) for k in missing)}")
            continue
        qid, image, text = obj["question_id"], obj["image"], obj["text"]
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            ds.skip(where, "question_id is neither a string nor an integer")
            continue
        if not isinstance(image, str) or not image or not isinstance(text, str) or not text.strip():
            ds.skip(where, "'image' and 'text' must be non-empty strings")
            continue
        try:
            answers = _answers(obj.get("answers", obj.get("answer")))
        except ValueError as exc:
            ds.skip(where, str(exc))
            continue
        qid = str(qid)
        if qid in seen:
            ds.skip(where, f"question_id {qid} repeats an earlier line")
            continue
        image_path = images / image
        refused = _outside(image_path, images, allow_outside)
        if refused:
            ds.skip(where, refused)
            continue
        seen.add(qid)
        ds.items.append(Item(qid, image_path, text, answers))
    return ds


def _read_json(path: Path, what: str):
    raw = read_regular(path, what, MAX_DATA_BYTES)
    try:
        return loads_bounded(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise VlmpruneError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})",
                            "check the file") from None
    except UnicodeDecodeError:
        raise VlmpruneError(f"{what} {path} is not UTF-8 text", "pass the JSON file") from None
    except ValueError as exc:
        raise VlmpruneError(f"{what} {path} is not valid JSON ({exc})", "check the file") from None


def _coco_candidates(images: Path, image_id, subtype: str | None) -> list[Path]:
    names = []
    if isinstance(image_id, int):
        if subtype:
            names.append(f"COCO_{subtype}_{image_id:012d}.jpg")
        names += [f"{image_id:012d}.jpg", f"{image_id}.jpg", f"{image_id}.png"]
    else:
        names += [str(image_id), f"{image_id}.jpg", f"{image_id}.png"]
    return [images / n for n in names]


def _vqav2(path: Path, annotations: Path | None, images: Path, limit: int | None,
           allow_outside: bool = False) -> Dataset:
    _image_dir(images)
    doc = _read_json(path, "questions file")
    if isinstance(doc, dict) and "annotations" in doc and "questions" not in doc:
        raise VlmpruneError(f"{path} is a VQAv2 annotations file", "pass the questions file as --data and this one "
                                                                   "as --annotations")
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise VlmpruneError(f"{path} has no 'questions' list", "pass a VQAv2-style questions JSON, or a LLaVA .jsonl")
    refs: dict[str, tuple[str, ...]] = {}
    if annotations is not None:
        ann = _read_json(annotations, "annotations file")
        if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
            raise VlmpruneError(f"{annotations} has no 'annotations' list", "pass the VQAv2 annotations JSON")
        for a in ann["annotations"]:
            if isinstance(a, dict) and "question_id" in a:
                try:
                    refs[str(a["question_id"])] = _answers(a.get("answers"))
                except ValueError:
                    refs[str(a["question_id"])] = ()
    ds = Dataset("vqav2", str(path))
    subtype = doc.get("data_subtype") if isinstance(doc.get("data_subtype"), str) else None
    seen: set[str] = set()
    for n, q in enumerate(doc["questions"]):
        if limit is not None and len(ds.items) >= limit:
            break
        where = f"{path.name} question #{n}"
        if not isinstance(q, dict) or not all(k in q for k in ("question_id", "image_id", "question")):
            ds.skip(where, "needs question_id, image_id and question")
            continue
        qid = str(q["question_id"])
        where = f"{path.name} question_id {qid}"
        if not isinstance(q["question"], str) or not q["question"].strip():
            ds.skip(where, "the question is not a non-empty string")
            continue
        if qid in seen:
            ds.skip(where, "repeats an earlier question_id")
            continue
        if annotations is not None and not refs.get(qid):
            ds.skip(where, f"no answers in {annotations.name}")
            continue
        if not isinstance(q["image_id"], (int, str)) or isinstance(q["image_id"], bool):
            ds.skip(where, "image_id is neither an integer nor a string")
            continue
        candidates = _coco_candidates(images, q["image_id"], subtype)
        found = next((p for p in candidates if os.path.lexists(p)), None)
        refused = _outside(found, images, allow_outside) if found is not None else None
        if refused:
            ds.skip(where, refused)
            continue
        if found is None:
            ds.skip(where, f"image for image_id {q['image_id']} not found in {images} "
                           f"(looked for {_coco_candidates(images, q['image_id'], subtype)[0].name})")
            continue
        seen.add(qid)
        ds.items.append(Item(qid, found, q["question"], refs.get(qid, ())))
    return ds


def _folder(folder: Path, prompt_file: Path | None, limit: int | None, allow_outside: bool = False) -> Dataset:
    if prompt_file is None:
        txts = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
        if len(txts) != 1:
            raise VlmpruneError(
                f"{folder} holds {len(txts)} .txt files; a folder of images needs exactly one prompt file",
                "pass --prompt-file PATH")
        prompt_file = txts[0]
    if not prompt_file.exists():
        raise VlmpruneError(f"prompt file {prompt_file} does not exist", "pass --prompt-file PATH")
    prompt = _text(prompt_file, "prompt file").strip()
    if not prompt:
        raise VlmpruneError(f"prompt file {prompt_file} is empty", "write the prompt into it")
    ds = Dataset("folder", str(folder))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for p in files:
        if limit and len(ds.items) >= limit:
            break
        refused = _outside(p, folder, allow_outside)  # a symbolic link inside that leads out
        if refused:
            ds.skip(p.relative_to(folder).as_posix(), refused)
            continue
        ds.items.append(Item(p.relative_to(folder).as_posix(), p, prompt))
    if not files:
        raise VlmpruneError(f"no images in {folder}", f"it needs files ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    return ds
