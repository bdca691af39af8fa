"""Answer-quality metrics for ``prune-eval``: exact match and VQA soft accuracy against reference answers, and
agreement of a pruned bucket's greedy answer with the unpruned bucket's (identical answer, first token, token F1,
common prefix). Pure Python: no torch, no numpy needed.

VQA accuracy follows one of two reference conventions, named in the report (``--vqa-convention``):

- ``lmms-eval`` (default): lmms-eval's VQAv2 scoring (``lmms_eval/tasks/vqav2/utils.py``
  ``vqav2_process_results`` with ``EvalAIAnswerProcessor`` from ``_task_utils/vqa_eval_metric.py``), which the
  pruning papers' tables are computed with. It normalises the prediction and every reference.
- ``vqaeval``: the official script (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
  ``VQAEval.evaluate``), which normalises only when the references disagree, and tests a "1,000"-style number
  with one comma between digits where lmms-eval accepts several (``1,,2``).

Both are transcribed rule by rule (not copied; ``tests/test_eval.py`` cites the lines) because no maintained package
on PyPI provides them without pulling a framework into the edge runtime. Shared quirks kept on purpose, since the
reported numbers carry them: the period pattern's ``re.UNICODE`` lands in ``count``, so at most 32 periods go; a
single reference leaves no other annotator to agree with, so it scores 0.
"""

from __future__ import annotations

import re
from collections import Counter

# --- VQA answer normalisation (official VQA evaluation rules) -------------------------------------------------------

# Contractions written without their apostrophe, mapped to the spelled form (the published table).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The test for a "1,000"-style number, which makes every punctuation mark vanish instead of becoming a space.
_NUMBER_COMMA = {"vqaeval": re.compile(r"(\d)(\,)(\d)"), "lmms-eval": re.compile(r"(?<=\d)(\,)+(?=\d)")}
VQA_CONVENTIONS = tuple(_NUMBER_COMMA)
# Both references use "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) lookahead that always holds, so it removes
# a period not followed by a digit ("3.5" keeps its point, "yes." loses it). Their ``sub("", s, re.UNICODE)`` passes
# the flag (32) as ``count``: at most 32 periods are removed.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)


def _convention(convention: str) -> str:
    if convention not in _NUMBER_COMMA:
        raise ValueError(f"unknown VQA convention {convention!r}; choose one of {', '.join(VQA_CONVENTIONS)}")
    return convention


def _punctuation(text: str, convention: str) -> str:
    out = text
    number_comma = _NUMBER_COMMA[convention].search(text) is not None
    for p in PUNCTUATION:
        # A mark touching a space, or any mark in a text with a "1,000"-style number, is deleted; otherwise it
        # becomes a space ("black/white" -> "black white"). Both tests look at the text as given, not as edited.
        if (p + " " in text or " " + p in text) or number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str, convention: str = "lmms-eval") -> str:
    """The VQA evaluation's answer normalisation: whitespace, punctuation, lower case, number words to digits,
    articles dropped, apostrophe-less contractions restored."""
    return _digits_articles(_punctuation(_clean(text), _convention(convention)))


def vqa_accuracy(prediction: str, answers: list[str], convention: str = "lmms-eval") -> float:
    """VQA soft accuracy: ``min(1, #other references equal to the answer / 3)`` averaged over leaving out each
    reference in turn (the ten annotators), under ``convention`` (see the module doc).

    The references' answer objects are distinct (each has its ``answer_id``), so "the others" are all but the one
    left out, duplicates included. With a single reference there is no other, so the score is 0."""
    convention = _convention(convention)
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = _clean(prediction)
    refs = [_clean(a) for a in answers]
    # vqaEval.py normalises only when the (stripped) references disagree; lmms-eval always does.
    if convention == "lmms-eval" or len(set(refs)) > 1:
        pred = _digits_articles(_punctuation(pred, convention))
        refs = [_digits_articles(_punctuation(r, convention)) for r in refs]
    scores = []
    for i in range(len(refs)):
        matches = sum(1 for j, r in enumerate(refs) if j != i and r == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def primary_answer(answers: list[str]) -> str:
    """The most frequent reference (first seen on ties): VQAv2's ``multiple_choice_answer`` rule."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def _light(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def exact_match(prediction: str, answers: list[str]) -> float:
    """1 if the answer equals the primary reference after trimming whitespace, a final period and case; else 0.
    Stricter than VQA accuracy on purpose: "a blue car" is not "blue"."""
    if not answers:
        raise ValueError("exact_match needs at least one reference answer")
    return float(_light(prediction) == _light(primary_answer(answers)))


# --- agreement with the unpruned bucket -----------------------------------------------------------------------------


def token_f1(a: list[int], b: list[int]) -> float:
    """F1 of the two generated token multisets (SQuAD's token F1, on the model's own tokens): order-free overlap.
    Two empty answers agree fully."""
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def common_prefix(a: list[int], b: list[int]) -> float:
    """Length of the longest common prefix over the longer answer's length: how far greedy decoding runs before
    the two diverge (1 for identical answers)."""
    if not a and not b:
        return 1.0
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b))


def agreement(pruned: dict, unpruned: dict) -> dict[str, float]:
    """Label-free agreement of one result record with the unpruned bucket's record for the same item.

    Records carry ``token_ids`` (generated, without the end-of-sequence token) and ``first_token`` (the first
    sampled token, the end-of-sequence token included, so an immediate stop is a first token too)."""
    a, b = pruned["token_ids"], unpruned["token_ids"]
    return {
        "identical_answer": float(a == b),
        "first_token": float(pruned["first_token"] == unpruned["first_token"]),
        "token_f1": token_f1(a, b),
        "common_prefix": common_prefix(a, b),
    }


def reference_scores(text: str, answers: list[str], convention: str = "lmms-eval") -> dict[str, float]:
    return {"exact_match": exact_match(text, answers), "vqa_accuracy": vqa_accuracy(text, answers, convention)}
