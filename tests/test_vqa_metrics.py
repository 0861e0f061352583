"""Protects the VQA accuracy numbers: both normalizers against hand-worked cases from the official
definitions (mmf EvalAIAnswerProcessor/TextVQAAccuracyEvaluator and GT-Vision-Lab vqaEval.py),
including the reference evaluators' quirks, which we must reproduce rather than fix."""

import pytest

from modeltest.errors import ModelTestError
from modeltest.metrics import get_metric
from modeltest.metrics.vqa import (
    exact_match,
    normalize_evalai,
    normalize_official_answer,
    normalize_official_prediction,
    vqa_accuracy_evalai,
    vqa_accuracy_official,
)

# (prediction, ten answers, evalai accuracy, official accuracy)
CASES = [
    # leave-one-out over 10 annotators: k matching answers -> 0.3, 0.6, 0.9, then 1.0
    ("x", ["x"] + ["o"] * 9, 0.3, 0.3),
    ("x", ["x"] * 2 + ["o"] * 8, 0.6, 0.6),
    ("dakota", ["dakota"] * 3 + ["other"] * 7, 0.9, 0.9),
    ("dakota", ["dakota"] * 4 + ["other"] * 6, 1.0, 1.0),
    # number words become digits, casing folds on the prediction side
    ("Two", ["2"] * 10, 1.0, 1.0),
    ("ten", ["10"] * 2 + ["ten"] * 8, 1.0, 0.6),  # official leaves "ten" answers alone: 2 matches of "10"
    # commas inside numbers: EvalAI drops every comma first; official strips punctuation when it
    # sees digit,digit - but only on answers that are not unanimous
    ("1,000", ["1,000"] * 10, 1.0, 0.0),
    ("1,000", ["1,000"] * 9 + ["1000"], 1.0, 1.0),
    ("1,,2", ["1 2"] * 10, 0.0, 1.0),
    # the official script neither lowercases nor strips ground-truth answers
    ("John's", ["John's"] * 3 + ["x"] * 7, 0.9, 0.0),
    ("john's", ["john's"] * 3 + ["x"] * 7, 0.9, 0.9),
    ("Yes!", ["yes!"] * 5 + ["no"] * 5, 1.0, 0.0),
    # contractions, articles, punctuation next to spaces, surrounding whitespace, periods
    ("dont", ["don't"] * 10, 1.0, 1.0),
    ("the Coca Cola", ["coca cola"] * 10, 1.0, 1.0),
    ("an apple", ["apple", "an apple"] * 5, 1.0, 1.0),
    ("coca - cola", ["coca-cola"] * 4 + ["coke"] * 6, 1.0, 1.0),
    ("  yes \n", ["yes"] * 10, 1.0, 1.0),
    ("U.S.A.", ["usa"] * 10, 1.0, 1.0),
    ("3.5", ["3.5"] * 10, 1.0, 1.0),
    # both evaluators pass re.UNICODE (32) as re.sub's count: only 32 periods go
    ("." * 32 + "x", ["x"] * 10, 1.0, 1.0),
    ("." * 40 + "x", ["x"] * 10, 0.0, 0.0),
    # empty prediction
    ("", ["yes"] * 10, 0.0, 0.0),
]


@pytest.mark.parametrize("pred, answers, evalai, official", CASES)
def test_accuracy_matches_reference_definitions(pred, answers, evalai, official):
    assert vqa_accuracy_evalai(pred, answers) == pytest.approx(evalai, abs=1e-9)
    assert vqa_accuracy_official(pred, answers) == pytest.approx(official, abs=1e-9)


def test_official_compares_whole_answer_records():
    # vqaEval.py leaves out `item != held_out` by value: records equal in every field (no
    # answer_id) drop out together, so nine identical others never count.
    assert vqa_accuracy_official("yes", [{"answer": "yes"}] * 10) == 0.0
    with_ids = [{"answer": "yes", "answer_id": i, "answer_confidence": "yes"} for i in range(1, 11)]
    assert vqa_accuracy_official("yes", with_ids) == 1.0


def test_records_and_strings_agree_for_evalai():
    answers = ["a dog"] * 2 + ["dog"] * 8
    records = [{"answer": a, "answer_id": i} for i, a in enumerate(answers, 1)]
    assert vqa_accuracy_evalai("Dog.", answers) == vqa_accuracy_evalai("Dog.", records) == 1.0


def test_normalizers_pinned_outputs():
    assert normalize_evalai("What's THE   answer?") == "what 's answer"
    assert normalize_evalai("coca-cola") == "coca cola"
    assert normalize_evalai("Im") == "im"  # contraction keys with capitals never match after lower()
    assert normalize_official_prediction("Hello, world") == "hello world"
    assert normalize_official_prediction("(one)") == "1"
    assert normalize_official_answer("Hello, World!") == "Hello World "  # ", " drops, "!" spaces; no lower/strip


def test_exact_match_and_registry():
    assert exact_match("Two", ["2", "3"]) == 1.0
    assert exact_match("four", ["2", "3"]) == 0.0
    assert get_metric("exact_match", "official").score("The Dog", ["dog"]) == 1.0
    m = get_metric("vqa_accuracy")
    assert m.aggregate([1.0, 0.0, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ModelTestError, match="did you mean 'vqa_accuracy'"):
        get_metric("vqa_acuracy")
