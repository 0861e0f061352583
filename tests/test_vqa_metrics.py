"""Protects the VQA accuracy numbers of the three normalizers (evalai, vqaeval, qwen_vl; official is an
alias of qwen_vl) against golden accuracies that the reference evaluators themselves computed, including
their quirks, which we must reproduce rather than fix."""

import pytest

from modeltest.errors import ModelTestError
from modeltest.metrics import NORMALIZERS, get_metric
from modeltest.metrics.vqa import (
    exact_match,
    normalize_evalai,
    normalize_official_answer,
    normalize_official_prediction,
    normalize_qwen_vl_answer,
    normalize_qwen_vl_prediction,
    normalize_vqaeval,
    vqa_accuracy_evalai,
    vqa_accuracy_official,
    vqa_accuracy_qwen_vl,
    vqa_accuracy_vqaeval,
)

# Golden accuracies, computed by RUNNING each reference on each case (not by this code), unmodified
# except for a harness that feeds it one question and keeps the unrounded per-question accuracy:
#   evalai:  facebookresearch/mmf mmf/utils/m4c_evaluators.py (last changed in 2dc099a; read at b0ffc7f),
#            TextVQAAccuracyEvaluator.eval_pred_list, Python 3.11.
#   vqaeval: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00 (current
#            master, 2021-03-11 "Fixed processing answers bug"), VQAEval.evaluate under Python 2.7.18;
#            the same file under Python 3 (its two print statements made calls) gives the same numbers.
#   qwen_vl: QwenLM/Qwen-VL eval_mm/vqa_eval.py (unchanged since 48454c3; read at aa00ed0),
#            VQAEval.evaluate under Python 3.11; GT-Vision-Lab's vqaEval.py at 458a8b2 (the commit
#            before a013f00) under Python 2.7.18 gives the same numbers.
# The vqaEval references got plain-string answers as records {"answer": a, "answer_id": i}, i = 1..10,
# as the annotation files have them (and as this code does).
# (prediction, ten answers, evalai, vqaeval, qwen_vl)
GOLDEN = [
    # leave-one-out over 10 annotators: k matching answers -> 0.3, 0.6, 0.9, then 1.0
    ("x", ["x"] + ["o"] * 9, 0.3, 0.3, 0.3),
    ("x", ["x"] * 2 + ["o"] * 8, 0.6, 0.6, 0.6),
    ("dakota", ["dakota"] * 3 + ["other"] * 7, 0.9, 0.9, 0.9),
    ("dakota", ["dakota"] * 4 + ["other"] * 6, 1.0, 1.0, 1.0),
    # vqaeval and qwen_vl agree: answers not unanimous, and what the ground truth needs is punctuation only
    ("dont", ["don't"] * 4 + ["x"] * 6, 1.0, 1.0, 1.0),
    ("an apple", ["apple", "an apple"] * 5, 1.0, 1.0, 1.0),
    ("coca - cola", ["coca-cola"] * 4 + ["coke"] * 6, 1.0, 1.0, 1.0),
    ("  yes \n", ["yes"] * 9 + ["no"], 1.0, 1.0, 1.0),
    ("U.S.A.", ["usa"] * 9 + ["us"], 1.0, 1.0, 1.0),
    ("3.5", ["3.5"] * 10, 1.0, 1.0, 1.0),
    ("1,000", ["1,000"] * 9 + ["1000"], 1.0, 1.0, 1.0),
    ("red white", ["red,white"] * 4 + ["x"] * 6, 0.0, 1.0, 1.0),
    # every evaluator passes re.UNICODE (32) as re.sub's count: only 32 periods go
    ("." * 32 + "x", ["x"] * 9 + ["y"], 1.0, 1.0, 1.0),
    ("." * 40 + "x", ["x"] * 9 + ["y"], 0.0, 0.0, 0.0),
    ("", ["yes"] * 10, 0.0, 0.0, 0.0),
    # unanimous answers: vqaeval processes neither side (exact match after strip); qwen_vl still
    # processes the prediction
    ("Two", ["2"] * 10, 1.0, 0.0, 1.0),
    ("the dog", ["dog"] * 10, 1.0, 0.0, 1.0),
    ("dont", ["don't"] * 10, 1.0, 0.0, 1.0),
    ("U.S.A.", ["usa"] * 10, 1.0, 0.0, 1.0),
    ("the Coca Cola", ["coca cola"] * 10, 1.0, 0.0, 1.0),
    ("." * 32 + "x", ["x"] * 10, 1.0, 0.0, 1.0),
    ("coca-cola", ["coca-cola"] * 10, 1.0, 1.0, 0.0),
    ("1,000", ["1,000"] * 10, 1.0, 1.0, 0.0),
    ("1,,2", ["1 2"] * 10, 0.0, 0.0, 1.0),
    # answers not unanimous: vqaeval gives the ground truth digit/article processing (numbers, articles,
    # contractions, lowercase) as well; qwen_vl gives it punctuation only
    ("ten", ["10"] * 2 + ["ten"] * 8, 1.0, 1.0, 0.6),
    ("dog", ["the dog"] * 4 + ["cat"] * 6, 1.0, 1.0, 0.0),
    ("two", ["Two"] * 3 + ["x"] * 7, 0.9, 0.9, 0.0),
    ("don't", ["dont"] * 3 + ["x"] * 7, 0.9, 0.9, 0.0),
    ("John's", ["John's"] * 3 + ["x"] * 7, 0.9, 0.9, 0.0),
    ("Yes!", ["yes!"] * 5 + ["no"] * 5, 1.0, 1.0, 0.0),
    # vqaeval strips ground-truth answers (and judges unanimity after that); qwen_vl never does
    ("yes", [" yes"] * 4 + ["no"] * 6, 1.0, 1.0, 0.0),
    ("yes", ["yes\n"] * 3 + ["no"] * 7, 0.9, 0.9, 0.0),
    ("yes", ["yes "] * 10, 1.0, 1.0, 0.0),
    ("Yes", ["yes", "yes "] * 5, 1.0, 0.0, 1.0),
    # evalai deletes every comma and '?' before anything else (mmf word_tokenize)
    ("redwhite", ["red,white"] * 10, 1.0, 0.0, 0.0),
    ("red white", ["red,white"] * 10, 0.0, 0.0, 0.0),
    ("ab", ["a?b"] * 4 + ["x"] * 6, 1.0, 0.0, 0.0),
]

# Answer records: vqaEval.py leaves one out by value (`item != gtAnsDatum`), so records equal in every
# field drop out together. Same references and versions as GOLDEN (mmf takes the answer texts).
_WITH_IDS = [{"answer": "yes", "answer_id": i, "answer_confidence": "yes"} for i in range(1, 11)]
RECORDS = [
    ("yes", [{"answer": "yes"}] * 10, 1.0, 0.0, 0.0),
    ("yes", _WITH_IDS, 1.0, 1.0, 1.0),
    # vqaeval strips before leaving out: the six "yes"/"yes " records become equal
    ("yes", [{"answer": "yes"}] * 3 + [{"answer": "yes "}] * 3 + [{"answer": "no"}] * 4, 1.0, 0.4, 0.7),
]


@pytest.mark.parametrize("pred, answers, evalai, vqaeval, qwen_vl", GOLDEN + RECORDS)
def test_accuracy_matches_reference_evaluators(pred, answers, evalai, vqaeval, qwen_vl):
    assert vqa_accuracy_evalai(pred, answers) == pytest.approx(evalai, abs=1e-9)
    assert vqa_accuracy_vqaeval(pred, answers) == pytest.approx(vqaeval, abs=1e-9)
    assert vqa_accuracy_qwen_vl(pred, answers) == pytest.approx(qwen_vl, abs=1e-9)


def test_golden_table_covers_both_sides_of_the_2021_fix():
    # The table is only a guard if it holds cases where the two vqaEval versions differ and where they agree.
    differ = sum(1 for *_, vqaeval, qwen_vl in GOLDEN + RECORDS if vqaeval != qwen_vl)
    assert differ >= 15 and len(GOLDEN + RECORDS) - differ >= 15


@pytest.mark.parametrize("pred, answers, evalai, vqaeval, qwen_vl", GOLDEN + RECORDS)
def test_official_is_qwen_vl(pred, answers, evalai, vqaeval, qwen_vl):
    assert vqa_accuracy_official(pred, answers) == pytest.approx(qwen_vl, abs=1e-9)
    assert get_metric("vqa_accuracy", "official").score(pred, answers) == pytest.approx(qwen_vl, abs=1e-9)
    em = get_metric("exact_match", "official").score(pred, answers)
    assert em == get_metric("exact_match", "qwen_vl").score(pred, answers)


def test_evalai_deletes_commas_first():
    # mmf word_tokenize deletes every comma before the punctuation rules, which would space it
    assert normalize_evalai("red,white") == "redwhite"
    assert normalize_evalai("1,000") == "1000"
    assert vqa_accuracy_evalai("redwhite", ["red,white"] * 10) == 1.0
    assert vqa_accuracy_evalai("red white", ["red,white"] * 10) == 0.0


def test_records_and_strings_agree_for_evalai():
    answers = ["a dog"] * 2 + ["dog"] * 8
    records = [{"answer": a, "answer_id": i} for i, a in enumerate(answers, 1)]
    assert vqa_accuracy_evalai("Dog.", answers) == vqa_accuracy_evalai("Dog.", records) == 1.0


def test_normalizers_pinned_outputs():
    assert normalize_evalai("What's THE   answer?") == "what 's answer"
    assert normalize_evalai("coca-cola") == "coca cola"
    assert normalize_evalai("Im") == "im"  # contraction keys with capitals never match after lower()
    assert normalize_vqaeval(" Hello, world\n") == "hello world"
    assert normalize_vqaeval("(one)") == "1"
    assert normalize_qwen_vl_prediction("The Dogs!") == "dogs"
    # ", " drops, "!" spaces; no lower/strip
    assert normalize_qwen_vl_answer("Hello, World!") == "Hello World "
    # names from before the split keep working (official = qwen_vl)
    assert normalize_official_prediction is normalize_qwen_vl_prediction
    assert normalize_official_answer is normalize_qwen_vl_answer


def test_registry_accepts_every_normalizer():
    assert NORMALIZERS == ("evalai", "vqaeval", "qwen_vl", "official")
    for name in NORMALIZERS:
        assert get_metric("vqa_accuracy", name).score("dakota", ["dakota"] * 4 + ["other"] * 6) == 1.0
        # exact_match: each source's full processing on both sides
        assert get_metric("exact_match", name).score("The Two", ["2", "3"]) == 1.0
        assert exact_match("four", ["2", "3"], name) == 0.0
    assert get_metric("vqa_accuracy", "vqaeval").score("Two", ["2"] * 10) == 0.0
    assert get_metric("vqa_accuracy", "qwen_vl").score("Two", ["2"] * 10) == 1.0
    with pytest.raises(ModelTestError, match="normalizer"):
        get_metric("vqa_accuracy", "vqa_eval")
    with pytest.raises(ValueError, match="unknown normalizer"):
        exact_match("yes", ["yes"], "vqa_eval")


def test_exact_match_and_registry():
    assert exact_match("Two", ["2", "3"]) == 1.0
    assert exact_match("four", ["2", "3"]) == 0.0
    assert get_metric("exact_match", "official").score("The Dog", ["dog"]) == 1.0
    m = get_metric("vqa_accuracy")
    assert m.aggregate([1.0, 0.0, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ModelTestError, match="did you mean 'vqa_accuracy'"):
        get_metric("vqa_acuracy")
