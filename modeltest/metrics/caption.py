"""Caption metrics: a per-sample `non_empty` check, and the COCO corpus metrics (BLEU-4, METEOR,
ROUGE-L, CIDEr) computed by pycocoevalcap on PTB-tokenized text, as COCO's own caption evaluation
(pycocoevalcap eval.py, used by Qwen-VL's eval_mm/evaluate_caption.py) computes them, without SPICE.

Captions are scored as plain text: grounding markup is stripped first (`strip_grounding`). The values
are pycocoevalcap's own scale (CIDEr 1.2 where papers print 120). pycocoevalcap is optional
(`pip install 'modeltest[caption]'`) and needs Java: its PTB tokenizer and METEOR are Java programs.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence

from ..errors import ModelTestError
from .grounding import strip_grounding

CORPUS_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def non_empty(prediction: str, references: Sequence = ()) -> float:
    """1 when the caption has any text once grounding markup is gone, else 0 (no reference needed)."""
    return 1.0 if strip_grounding(prediction) else 0.0


def require_caption_scorers(what: str) -> None:
    """Fail early (before any model loads) when pycocoevalcap or Java is missing; `what` names the
    file that asked for the metrics."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ModelTestError(
            f"{what}: caption metrics need pycocoevalcap, which is not installed; "
            "run `pip install 'modeltest[caption]'` (or `pip install pycocoevalcap`), or drop annotations_path"
        ) from None
    if shutil.which("java") is None:
        raise ModelTestError(
            f"{what}: caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR are Java programs) "
            "and `java` is not on PATH; install a Java runtime, on Debian/Ubuntu `apt-get install "
            "default-jre-headless`, or drop annotations_path to write captions without scores"
        )


def coco_caption_scores(predictions: Mapping, references: Mapping) -> dict[str, float]:
    """{id: caption} and {id: [reference captions]} (same ids) -> {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}.
    Predictions are taken as given (strip grounding markup before calling)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    if not predictions:
        return {}
    # One tokenizer run for both sides (each line is tokenized on its own, so this equals two runs).
    both = {("res", k): [{"caption": predictions[k]}] for k in predictions}
    both.update({("gts", k): [{"caption": c} for c in references[k]] for k in references})
    tokens = PTBTokenizer().tokenize(both)
    res = {k: tokens[("res", k)] for k in predictions}
    gts = {k: tokens[("gts", k)] for k in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_scorer = Meteor()
    try:
        meteor, _ = meteor_scorer.compute_score(gts, res)
    finally:
        del meteor_scorer  # its __del__ ends the Java process
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "METEOR": float(meteor), "ROUGE-L": float(rouge), "CIDEr": float(cider)}
