"""Transcriptions of the two VQA scoring references, kept line for line in the references' own shape (answer dicts,
the in-place edits, the loops) so that ``runtime/eval_metrics.py``, written differently, is checked against them.

- ``official``: GT-Vision-Lab/VQA @ a013f0043c1e2cdc995922dfe257f7149aa9af06,
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``: ``evaluate`` lines 86-112, ``processPunctuation`` lines
  130-140, ``processDigitArticle`` lines 142-155, patterns lines 62-66.
- ``lmms_eval``: EvolvingLMMs-Lab/lmms-eval @ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3,
  ``lmms_eval/tasks/vqav2/utils.py`` ``vqav2_process_results`` lines 15-42, with
  ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py`` ``EvalAIAnswerProcessor`` lines 148-206.

The word tables (contractions, number words, articles, punctuation) are identical in both references; the test
takes them from the module under test after checking a sample of entries by hand.
"""

from __future__ import annotations

import re
import statistics

from vlmprune.runtime.eval_metrics import ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION

PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # vqaEval.py:62, vqa_eval_metric.py:149
COMMA_STRIP_OFFICIAL = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py:63
COMMA_STRIP_LMMS = re.compile(r"(?<=\d)(\,)+(?=\d)")  # vqa_eval_metric.py:150


def process_punctuation(in_text: str, comma_strip: re.Pattern) -> str:  # vqaEval.py:130-140, vqa_eval_metric.py:183-191
    out_text = in_text
    for p in PUNCTUATION:
        if (p + " " in in_text or " " + p in in_text) or (re.search(comma_strip, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    out_text = PERIOD_STRIP.sub("", out_text, re.UNICODE)  # the flag is the third positional argument: count
    return out_text


def process_digit_article(in_text: str) -> str:  # vqaEval.py:142-155, vqa_eval_metric.py:193-206
    out_text = []
    temp_text = in_text.lower().split()
    for word in temp_text:
        word = dict(NUMBER_WORDS).setdefault(word, word)
        if word not in ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in CONTRACTIONS:
            out_text[word_id] = CONTRACTIONS[word]
    return " ".join(out_text)


def _answer_dicts(answers: list[str]) -> list[dict]:
    # VQAv2 answer objects carry answer_id 1..10, which makes each dict distinct in the `item != gtAnsDatum` test.
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def official(res_ans: str, answers: list[str]) -> float:  # vqaEval.py:86-112, one question
    gts = _answer_dicts(answers)
    for ans_dic in gts:
        ans_dic["answer"] = ans_dic["answer"].replace("\n", " ").replace("\t", " ").strip()
    res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
    gt_acc = []
    gt_answers = [ans["answer"] for ans in gts]
    if len(set(gt_answers)) > 1:
        for ans_dic in gts:
            ans_dic["answer"] = process_punctuation(ans_dic["answer"], COMMA_STRIP_OFFICIAL)
            ans_dic["answer"] = process_digit_article(ans_dic["answer"])
        res_ans = process_punctuation(res_ans, COMMA_STRIP_OFFICIAL)
        res_ans = process_digit_article(res_ans)
    for gt_ans_datum in gts:
        other_gt_ans = [item for item in gts if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching_ans)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


def lmms_eval(res_ans: str, answers: list[str]) -> float:  # utils.py:15-42
    docs = _answer_dicts(answers)
    for ans_dic in docs:
        ans_dic["answer"] = ans_dic["answer"].replace("\n", " ").replace("\t", " ").strip()
    res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
    gt_acc = []
    for ans_dic in docs:
        ans_dic["answer"] = process_punctuation(ans_dic["answer"], COMMA_STRIP_LMMS)
        ans_dic["answer"] = process_digit_article(ans_dic["answer"])
    res_ans = process_punctuation(res_ans, COMMA_STRIP_LMMS)
    res_ans = process_digit_article(res_ans)
    for gt_ans_datum in docs:
        other_gt_ans = [item for item in docs if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching_ans)) / 3))
    return statistics.mean(gt_acc)
