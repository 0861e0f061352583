"""VQA accuracy and its two answer normalizers, as the reference evaluators define them.

- `evalai`: the EvalAI answer processor of the TextVQA challenge, as in facebookresearch/mmf
  `mmf/utils/m4c_evaluators.py` (EvalAIAnswerProcessor + TextVQAAccuracyEvaluator) and lmms-eval.
  Prediction and every ground-truth answer are processed the same way.
- `official`: GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (current master,
  also what Qwen-VL's eval_mm/vqa_eval.py runs). The prediction gets punctuation + digit/article
  processing; the ground truth gets punctuation processing only, and only when the answers are not
  all identical; leave-one-out compares whole answer records, so records that are equal in every
  field drop out together.

Shared quirks kept on purpose: punctuation is removed or spaced depending on the *original* text;
the period rule is applied at most 32 times (both evaluators pass `re.UNICODE`, whose value is 32,
as the `count` argument of `re.sub`); contractions are looked up after lowercasing, so keys such as
"Im" never match.

Accuracy per question = mean over the n leave-one-out subsets of min(1, matches among the others / 3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

# Contractions without the apostrophe -> with it, as both evaluators list them.
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
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

# "(?!<=\d)" is a lookahead for the literal "<=" and a digit: it never blocks a ".", so this
# removes every period that is not followed by a digit (up to 32 of them, see module docstring).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = 32
_COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")
_COMMA_STRIP_OFFICIAL = re.compile(r"(\d)(\,)(\d)")


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
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text, _COMMA_STRIP_EVALAI)
    return _process_digit_article(text)


@lru_cache(maxsize=65536)
def normalize_official_prediction(answer: str) -> str:
    """How vqaEval.py processes a predicted answer."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text, _COMMA_STRIP_OFFICIAL)
    return _process_digit_article(text)


@lru_cache(maxsize=65536)
def normalize_official_answer(answer: str) -> str:
    """How vqaEval.py processes a ground-truth answer (when the answers are not unanimous)."""
    return _process_punctuation(answer, _COMMA_STRIP_OFFICIAL)


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


def vqa_accuracy_official(prediction: str, answers: Sequence) -> float:
    """VQA accuracy exactly as GT-Vision-Lab vqaEval.py computes it for one question."""
    pred = normalize_official_prediction(prediction)
    # Answer records as the official annotations have them; plain strings are given distinct
    # answer ids the way the VQA annotation files number them (1..n).
    records = [
        dict(a) if isinstance(a, dict) else {"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)
    ]
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = normalize_official_answer(r["answer"])
    matches = []
    for held_out in records:
        others = [r for r in records if r != held_out]
        matches.append(sum(1 for r in others if r["answer"] == pred))
    return _loo_accuracy(matches)


def exact_match(prediction: str, answers: Sequence, normalizer: str = "evalai") -> float:
    """1.0 when the normalized prediction equals any normalized answer."""
    norm = normalize_evalai if normalizer == "evalai" else normalize_official_prediction
    pred = norm(prediction)
    return 1.0 if any(norm(answer_text(a)) == pred for a in answers) else 0.0
