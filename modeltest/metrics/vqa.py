"""VQA accuracy under three answer normalizers, each as its reference evaluator computes it.

- `evalai`: the EvalAI answer processor of the TextVQA challenge, as in facebookresearch/mmf
  `mmf/utils/m4c_evaluators.py` (EvalAIAnswerProcessor + TextVQAAccuracyEvaluator; file last changed
  in 2dc099a, 2020-08-05) and lmms-eval. Prediction and every ground-truth answer are processed the
  same way: lowercase, delete every "," and "?" and split "'s" off first (so "red,white" ->
  "redwhite"), then punctuation, number words, articles, contractions.
- `vqaeval`: GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` at its current
  master, a013f00 (2021-03-11, "Fixed processing answers bug"). Ground-truth answers and the
  prediction are stripped (newlines and tabs become spaces). If the stripped answers are not all
  identical, both sides get punctuation and digit/article processing (so both are lowercased);
  if they are unanimous, neither does: the stripped prediction must equal the answer exactly,
  case and punctuation included.
- `qwen_vl`: QwenLM/Qwen-VL `eval_mm/vqa_eval.py` (unchanged since 48454c3, 2023-08-22), which
  `eval_mm/evaluate_vqa.py` runs for TextVQA; it is a Python 3 copy of vqaEval.py as it was before
  a013f00 (458a8b2, 2016). The prediction is stripped and always gets punctuation and digit/article
  processing; the ground truth is never stripped nor lowercased and gets punctuation processing only,
  and only when the raw answers are not all identical.
- `official`: an alias of `qwen_vl`. It has always computed the Qwen-VL copy, so results recorded
  under `official` keep their numbers; choose `vqaeval` or `qwen_vl` to say which one you mean.

`vqaeval` and `qwen_vl` differ exactly by the a013f00 diff. Both compare whole answer records when
leaving one out (`item != gtAnsDatum`), so records equal in every field (no `answer_id`) drop out
together; plain-string answers are given answer ids 1..n as the annotation files have them.

Shared quirks kept on purpose: punctuation is removed or spaced depending on the *original* text;
the period rule is applied at most 32 times (every evaluator passes `re.UNICODE`, whose value is 32,
as the `count` argument of `re.sub`); contractions are looked up after lowercasing, so keys such as
"Im" never match. Regexes and string methods have Python 3 semantics, as Qwen-VL and mmf run them.
GT-Vision-Lab's file is Python 2 code; Python 2.7 running it gives the same numbers except on
exotic non-ASCII text: its `\\d` matches ASCII digits only (Python 3: any Unicode digit), it counts
U+180E as whitespace, and its lowercasing (Unicode 5.2, one letter at a time) knows fewer letters,
maps "İ" to "i" and has no final "ς".

Accuracy per question = mean over the n leave-one-out subsets of min(1, matches among the others / 3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

# Contractions without the apostrophe -> with it, as every evaluator lists them (same table in all three).
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've|something'dve something'd've
somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've
therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll
theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've
wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't
wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all
yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've
youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split(" ") for pair in _CONTRACTION_PAIRS.replace("\n", "|").split("|") if pair.strip()
)

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip

# "(?!<=\d)" is a lookahead for the literal "<=" and a digit: it never blocks a ".", so this
# removes every period that is not followed by a digit (up to 32 of them, see module docstring).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = 32
_COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")
_COMMA_STRIP_VQAEVAL = re.compile(r"(\d)(\,)(\d)")


def _process_punctuation(text: str, comma_strip: re.Pattern) -> str:
    out = text
    has_number_comma = comma_strip.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


@lru_cache(maxsize=65536)
def normalize_evalai(answer: str) -> str:
    """EvalAI answer processor (TextVQA challenge; mmf EvalAIAnswerProcessor)."""
    # word_tokenize deletes every comma before anything else: "red,white" -> "redwhite", not "red white"
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text, _COMMA_STRIP_EVALAI)
    return _process_digit_article(text)


def _clean(text: str) -> str:
    """vqaEval.py's first step: newlines and tabs become spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@lru_cache(maxsize=65536)
def normalize_vqaeval(answer: str) -> str:
    """vqaEval.py's full processing: strip, punctuation, digit/article (which lowercases).

    Both versions give it to the prediction (the 2021 one only when the answers are not unanimous);
    the 2021 version also gives it to each ground-truth answer in that case.
    """
    return _process_digit_article(_process_punctuation(_clean(answer), _COMMA_STRIP_VQAEVAL))


@lru_cache(maxsize=65536)
def normalize_qwen_vl_answer(answer: str) -> str:
    """How Qwen-VL's copy (vqaEval.py before 2021) processes a ground-truth answer when the answers
    are not unanimous: punctuation only, without strip or lowercase."""
    return _process_punctuation(answer, _COMMA_STRIP_VQAEVAL)


# Qwen-VL's copy processes the prediction exactly as the 2021 file processes both sides.
normalize_qwen_vl_prediction = normalize_vqaeval
# Names from before `official` was split into vqaeval / qwen_vl (official = qwen_vl).
normalize_official_prediction = normalize_qwen_vl_prediction
normalize_official_answer = normalize_qwen_vl_answer


def _loo_accuracy(matches: Sequence[int]) -> float:
    """Mean over the leave-one-out subsets; matches[i] = matches among the others when i is left out."""
    accs = [min(1, float(m) / 3) for m in matches]
    return sum(accs) / len(accs)


def answer_text(answer) -> str:
    """Ground-truth answers come as strings or as VQA answer records {"answer": ..., ...}."""
    return answer["answer"] if isinstance(answer, dict) else answer


def vqa_accuracy_evalai(prediction: str, answers: Sequence) -> float:
    """TextVQA accuracy as mmf's TextVQAAccuracyEvaluator computes it for one question."""
    pred = normalize_evalai(prediction)
    gts = [normalize_evalai(answer_text(a)) for a in answers]
    total = sum(1 for g in gts if g == pred)
    if total == 0:  # mmf scores an answer outside the human answers as 0.0
        return 0.0
    return _loo_accuracy([total - (g == pred) for g in gts])


def _answer_records(answers: Sequence) -> list[dict]:
    """Copies of the answer records as vqaEval.py sees them (it edits them in place). Plain strings
    are given distinct answer ids the way the VQA annotation files number them (1..n)."""
    return [
        dict(a) if isinstance(a, dict) else {"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)
    ]


def _loo_records(records: Sequence[dict], pred: str) -> float:
    # vqaEval.py leaves out by value (`item != gtAnsDatum`): records equal in every field drop out together.
    matches = []
    for held_out in records:
        others = [r for r in records if r != held_out]
        matches.append(sum(1 for r in others if r["answer"] == pred))
    return _loo_accuracy(matches)


def vqa_accuracy_vqaeval(prediction: str, answers: Sequence) -> float:
    """VQA accuracy as GT-Vision-Lab's current vqaEval.py (a013f00) computes it for one question."""
    records = _answer_records(answers)
    for r in records:
        r["answer"] = _clean(r["answer"])
    pred = _clean(prediction)
    # Unanimity is judged on the stripped answers; when unanimous nothing else is done to either side.
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = normalize_vqaeval(r["answer"])  # _clean is idempotent, so this is punct + digit
        pred = normalize_vqaeval(pred)
    return _loo_records(records, pred)


def vqa_accuracy_qwen_vl(prediction: str, answers: Sequence) -> float:
    """VQA accuracy as Qwen-VL's eval_mm/vqa_eval.py (vqaEval.py before 2021) computes it for one question."""
    pred = normalize_qwen_vl_prediction(prediction)
    records = _answer_records(answers)
    # Unanimity is judged on the raw answers; the ground truth is never stripped or lowercased.
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = normalize_qwen_vl_answer(r["answer"])
    return _loo_records(records, pred)


# `official` has always computed the Qwen-VL copy; it stays its alias so recorded numbers keep meaning.
OFFICIAL_ALIAS = "qwen_vl"
vqa_accuracy_official = vqa_accuracy_qwen_vl


def evaluator(normalizer: str) -> str:
    """The reference evaluator a normalizer name computes (`official` is `qwen_vl`)."""
    return OFFICIAL_ALIAS if normalizer == "official" else normalizer


VQA_ACCURACY = {
    "evalai": vqa_accuracy_evalai,
    "vqaeval": vqa_accuracy_vqaeval,
    "qwen_vl": vqa_accuracy_qwen_vl,
    "official": vqa_accuracy_qwen_vl,
}
NORMALIZERS = tuple(VQA_ACCURACY)

# exact_match has no reference evaluator: it applies each source's full processing to both sides
# (for vqaEval.py, both versions process a prediction the same way).
_EXACT_MATCH_NORMALIZE = {
    "evalai": normalize_evalai,
    "vqaeval": normalize_vqaeval,
    "qwen_vl": normalize_qwen_vl_prediction,
    "official": normalize_qwen_vl_prediction,
}


def exact_match(prediction: str, answers: Sequence, normalizer: str = "evalai") -> float:
    """1.0 when the normalized prediction equals any normalized answer."""
    if normalizer not in _EXACT_MATCH_NORMALIZE:
        raise ValueError(f"unknown normalizer {normalizer!r}; expected one of {', '.join(NORMALIZERS)}")
    norm = _EXACT_MATCH_NORMALIZE[normalizer]
    pred = norm(prediction)
    return 1.0 if any(norm(answer_text(a)) == pred for a in answers) else 0.0
