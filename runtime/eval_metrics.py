"""Answer-quality metrics for ``prune-eval``: exact match and VQA soft accuracy against reference answers, and
agreement of a pruned bucket's greedy answer with the unpruned bucket's (identical answer, first token, token F1,
common prefix). Pure Python: no torch, no numpy needed.

The VQA answer normalisation is written by hand from the published rules of the official VQA evaluation script
(GT-Vision-Lab/VQA, ``vqaEval.py``: punctuation, number words, articles, contractions) because no maintained
package on PyPI provides it without pulling a framework (lmms-eval, mmpretrain) into the edge runtime.
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
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) lookahead that always holds, so in
# effect it removes every period not followed by a digit ("3.5" keeps its point, "yes." loses it). Same here.
_PERIOD = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # Official rule: a mark touching a space, or any mark in a text with a "1,000"-style number, is deleted;
        # otherwise it becomes a space ("black/white" -> "black white").
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation: whitespace, punctuation, lower case, number words to digits,
    articles dropped, apostrophe-less contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA soft accuracy: ``min(1, #matching references / 3)`` averaged over the leave-one-out subsets of the
    references (the official averaging over the ten annotators).

    The official script normalises only when the references disagree, because VQAv2's references are already
    normalised and LLaVA / lmms-eval normalise predictions before scoring; this always normalises both sides,
    which scores VQAv2 the same way and is fair to user references written freely. With one reference there is no
    subset to leave one out of, so the score is 1 if the normalised answers match, else 0."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
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


def reference_scores(text: str, answers: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(text, answers), "vqa_accuracy": vqa_accuracy(text, answers)}
