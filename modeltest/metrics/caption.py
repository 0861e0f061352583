"""Caption metrics: a per-sample `non_empty` check, and the COCO corpus metrics (BLEU-4, METEOR,
ROUGE-L, CIDEr) computed by pycocoevalcap on PTB-tokenized text, as COCO's own caption evaluation
(pycocoevalcap eval.py, used by Qwen-VL's eval_mm/evaluate_caption.py) computes them, without SPICE.

Captions are scored as plain text: grounding markup is stripped first (`strip_grounding`). The values
are pycocoevalcap's own scale (CIDEr 1.2 where papers print 120). pycocoevalcap is optional
(`pip install 'modeltest[caption]'`) and needs Java: its PTB tokenizer and METEOR are Java programs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

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

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    if not predictions:
        return {}
    # One tokenizer run for both sides (each line is tokenized on its own, so this equals two runs).
    ids = list(predictions)
    refs = [(k, c) for k in ids for c in references[k]]
    tokens = ptb_tokenize([predictions[k] for k in ids] + [c for _, c in refs])
    res = {k: [t] for k, t in zip(ids, tokens[: len(ids)], strict=True)}
    gts: dict = {k: [] for k in ids}
    for (k, _), t in zip(refs, tokens[len(ids) :], strict=True):
        gts[k].append(t)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_scorer = Meteor()
    try:
        meteor, _ = meteor_scorer.compute_score(gts, res)
    finally:
        del meteor_scorer  # its __del__ ends the Java process
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "METEOR": float(meteor), "ROUGE-L": float(rouge), "CIDEr": float(cider)}


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer: Stanford CoreNLP 3.4.1's PTB tokenizer, lower-cased, one caption per
    line, then its list of punctuation tokens dropped. Run as pycocoevalcap runs it, with two differences
    that leave every caption's tokens as they are:
    - its input file goes to a temporary folder; pycocoevalcap writes it into its own package folder,
      which fails where site-packages is read-only (a system-wide install used by another account);
    - every line break inside a caption becomes a space; pycocoevalcap does this only for '\\n', and the
      tokenizer also ends a line at '\\r', '\\v', '\\f', U+2028 and U+2029, which splits that caption in two
      and silently scores every later caption against the next image's references.
    A tokenizer output that still does not line up with its input is an error, never a shifted score."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if not captions:
        return []
    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    lines = [" ".join(c.splitlines()) for c in captions]
    with tempfile.TemporaryDirectory(prefix="modeltest-ptb-") as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_bytes("\n".join(lines).encode())
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        done = subprocess.run([*cmd, str(src)], capture_output=True)
    if done.returncode != 0:
        raise ModelTestError(
            f"pycocoevalcap's PTB tokenizer ({jar}) failed with exit code {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()[-2000:]}"
        )
    # a line per input line, the last one unterminated like the input's
    out = done.stdout.decode().split("\n")
    if len(out) != len(lines):
        raise ModelTestError(
            f"pycocoevalcap's PTB tokenizer returned {len(out)} lines for {len(lines)} captions; "
            "the captions cannot be matched to their tokens"
        )
    drop = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in out]
