"""Protects incremental detokenization (the real Qwen vocabulary, no model):

- the Qwen-VL token stream gives, after every id, final text + pending text == decode(ids so far),
  and its deltas + finish == decode(all ids): characters split over ids, invalid UTF-8, special
  tokens, ids past the vocabulary, image spans closed (their slots read as a path) and left open;
- stop strings found step by step on the new text stop at the same step, with the same text, as
  searching the whole decoded text every step; a streaming consumer's deltas add up to that text.
"""

from __future__ import annotations

import random

import pytest

from engine.detokenizer import Detokenizer
from engine.models.qwen_vl.random_checkpoint import qwen_vocab_file
from engine.models.qwen_vl.tokenizer import IMG_SPAN, QwenVLTokenizer


@pytest.fixture(scope="module")
def tok() -> QwenVLTokenizer:
    return QwenVLTokenizer(qwen_vocab_file())


def _span(tok, path: str, close: bool = True) -> list[int]:
    raw = list(path.encode())
    return [tok.img_start_id, *raw, *[tok.img_pad_id] * (IMG_SPAN - len(raw)), *([tok.img_end_id] if close else [])]


def _cases(tok) -> list[list[int]]:
    rng = random.Random(0)
    text = tok.encode("naïve café 你好，世界！ 😀🚀 ÅÆØ ½ \u200b done")
    bytes_only = [rng.randrange(256) for _ in range(60)]  # single-byte tokens: invalid UTF-8 runs too
    specials = [tok.eod_id, tok.im_start_id, tok.im_end_id, tok.special_tokens["<ref>"], 151900, 151935]
    return [
        text,
        bytes_only,
        text[:5] + specials + text[5:],
        tok.encode("see ") + _span(tok, "/data/é.jpg") + tok.encode(" and that"),
        tok.encode("open ") + _span(tok, "/tmp/x", close=False) + tok.encode("你好"),  # no </img>: ids as they are
        _span(tok, "a") + [tok.img_start_id] + tok.encode("b") + [tok.img_end_id] + text[:3],  # <img> then a short span
        [rng.randrange(tok.vocab_size + 80) for _ in range(200)],
    ]


def test_stream_equals_decode_after_every_id(tok):
    for ids in _cases(tok):
        stream = tok.token_stream()
        final = ""
        for n, token in enumerate(ids, 1):
            final += stream.push(token)
            assert final + stream.pending() == tok.decode(ids[:n]), (ids[:n], final)
        assert final + stream.finish() == tok.decode(ids)


def _reference(tok, ids: list[int], stop: list[str]) -> tuple[int, str]:
    """The old way: decode everything each step, earliest stop string wins. (tokens used, text)."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        hits = [(text.find(s), s) for s in stop if s in text]
        if hits:
            return n, text[: min(hits)[0]]
    return len(ids), tok.decode(ids)


def _step_by_step(tok, ids: list[int], stop: list[str]) -> tuple[int, str, list[str]]:
    """As the engine runs it: push, look for a stop string, stop. (tokens used, text, what a streaming
    consumer saw after each step), checking the streamed text only ever grows."""
    detok = Detokenizer(tok.token_stream(), stop)
    streamed = [""]
    for used, token in enumerate(ids, 1):
        detok.push(token)
        hit = detok.find_stop()
        if hit is not None:
            detok.finish(cut=hit[0])
            return used, detok.text, streamed
        visible = detok.visible_text(finished=False)
        assert visible.startswith(streamed[-1])
        streamed.append(visible)
    detok.finish()
    assert detok.visible_text(finished=True) == detok.text
    return len(ids), detok.text, streamed


def _byte_ids(tok, text: str) -> list[int]:
    """`text` as one id per UTF-8 byte: every multi-byte character split over several ids."""
    return [tok.encoding.encode_single_token(bytes([b])) for b in text.encode()]


def test_a_stop_string_ending_in_a_split_character_is_found(tok):
    """While a character is incomplete the text shown for it is provisional (U+FFFD): the search must
    look at that stretch again once the character is whole."""
    for stop in (["a😀"], ["😀y"], ["你😀"]):
        ids = tok.encode("xa") + _byte_ids(tok, "😀") + tok.encode("yz") + _byte_ids(tok, "你😀") + tok.encode("!")
        assert _step_by_step(tok, ids, stop)[:2] == _reference(tok, ids, stop)


def test_stop_strings_on_new_text_match_a_whole_text_search(tok):
    rng = random.Random(1)
    pieces = ["ab", "a", "b", " ", "\n", "ba", "é", "你", "ab\n", "xyz"]
    stops = [["ba"], ["a\nb", "xyz"], ["é你"], ["b b", "zz"], ["\n\n"], ["yzab"]]
    checked = 0
    for _ in range(150):
        ids = tok.encode("".join(rng.choice(pieces) for _ in range(rng.randrange(3, 25))))
        stop = rng.choice(stops)
        want_n, want_text = _reference(tok, ids, stop)
        used, text, streamed = _step_by_step(tok, ids, stop)
        assert (used, text) == (want_n, want_text), (ids, stop)
        assert text.startswith(streamed[-1])
        checked += want_n < len(ids)
    assert checked > 30  # many of the texts did hit a stop string
