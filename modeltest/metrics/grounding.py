"""Qwen-VL grounding markup: `<ref>text</ref><box>(x1,y1),(x2,y2)</box>` (and `<quad>…</quad>`).

Captions keep the markup in the seed's JSON; scorers (CLIP, COCO metrics) see plain text: a ref
keeps its words, boxes and quads go. Reference: Qwen-VL tokenization_qwen.py (`_fetch_all_box_with_ref`
and the ref/box/quad special tokens).
"""

from __future__ import annotations

import re

_SPANS = re.compile(r"<(box|quad)>.*?(?:</\1>|$)", re.DOTALL)  # an unclosed box (cut generation) runs to the end
_TAGS = re.compile(r"</?(ref|box|quad)>")
_SPACES = re.compile(r"\s+")


def strip_grounding(text: str) -> str:
    """Plain text of a grounded caption: `<ref>a dog</ref><box>(1,2),(3,4)</box> runs` -> `a dog runs`."""
    text = _SPANS.sub(" ", text)
    text = _TAGS.sub("", text)  # a ref's words stay; an unclosed tag left by a cut generation goes
    text = _SPACES.sub(" ", text).strip()
    return re.sub(r"\s+([.,;:!?])", r"\1", text)
