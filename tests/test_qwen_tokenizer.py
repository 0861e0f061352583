"""Protects the engine's Qwen-VL tokenizer: plain text must tokenize exactly as dashscope's own Qwen
tokenizer does (same qwen.tiktoken), special tokens sit at the original ids, and image spans follow
the original 258-id convention both ways."""

from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.models.qwen_vl.tokenizer import IMG_SPAN, QwenVLTokenizer


@pytest.fixture(scope="module")
def vocab() -> Path:
    import dashscope

    return Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"


@pytest.fixture(scope="module")
def tok(vocab) -> QwenVLTokenizer:
    return QwenVLTokenizer(vocab)


TEXTS = [
    "What is the brand of this camera? Answer:",
    "通义千问是阿里云研发的大规模语言模型。请描述这张图片。",
    "def f(x):\n\treturn x ** 2  # square\n\n\n",
    "emoji 🤖🎉 and accents: café, naïve, Ω≈ç√",
    "   leading and trailing   \n\n   ",
    "NFC: e\u0301 vs é; I'm, you'll, they'RE 1234567 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_matches_dashscope(tok, text):
    from dashscope import get_tokenizer

    ref = get_tokenizer("qwen-7b-chat")
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))


def test_special_token_ids(tok):
    assert tok.vocab_size == 151860
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|extra_0|>": 151646,
                "<|extra_204|>": 151850, "<ref>": 151851, "</ref>": 151852, "<box>": 151853, "</box>": 151854,
                "<quad>": 151855, "</quad>": 151856, "<img>": 151857, "</img>": 151858, "<imgpad>": 151859}  # fmt: skip
    for text, i in expected.items():
        assert tok.encoding.encode(text, allowed_special="all") == [i], text
    assert tok.encode("<ref>x</ref><|extra_3|>")[::2] == [151851, 151852]


def test_image_span_is_258_ids_with_path_bytes(tok):
    path = "/data/图片/a b.jpg"
    ids = tok.encode(f"Picture 1: <img>{path}</img>\nWhat is this? Answer:")
    start = ids.index(tok.img_start_id)
    span = ids[start : start + IMG_SPAN + 2]
    raw = path.encode("utf-8")
    assert span[0] == 151857 and span[-1] == 151858 and len(span) == 258
    assert span[1 : 1 + len(raw)] == list(raw)
    assert span[1 + len(raw) : -1] == [151859] * (IMG_SPAN - len(raw))
    assert tok.image_paths(ids) == [(start, path)]
    assert tok.decode(ids) == f"Picture 1: <img>{path}</img>\nWhat is this? Answer:"
    # as in the original: the span decodes back to the path, then only the tags are dropped
    assert tok.decode(ids, skip_special_tokens=True) == f"Picture 1: {path}\nWhat is this? Answer:"


def test_two_images_and_limits(tok):
    ids = tok.encode("<img>a.png</img><img>b.png</img>hi")
    assert [p for _, p in tok.image_paths(ids)] == ["a.png", "b.png"]
    assert len(ids) == 2 * 258 + len(tok.encode("hi"))
    tok.encode(f"<img>{'x' * 256}</img>")  # exactly fills the span
    with pytest.raises(EngineError, match="at most 256"):
        tok.encode(f"<img>{'x' * 257}</img>")
    with pytest.raises(EngineError, match="unclosed <img>"):
        tok.encode("<img>a.png")


def test_grounding_text_survives_decode(tok):
    text = "<ref>the cat</ref><box>(12,34),(567,890)</box>"
    assert tok.decode(tok.encode(text)) == text
    assert QwenVLTokenizer.from_list_format([{"image": "a.jpg"}, {"text": "Describe"}, {"ref": "cat", "box": [(1, 2, 3, 4)]}]) == (
        "Picture 1: <img>a.jpg</img>\nDescribe<ref>cat</ref><box>(1,2),(3,4)</box>"
    )


def test_bad_vocabulary_files(tmp_path):
    with pytest.raises(EngineError, match="vocabulary not found"):
        QwenVLTokenizer(tmp_path)
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\nnot-a-line\n")
    with pytest.raises(EngineError, match="qwen.tiktoken:2"):
        QwenVLTokenizer(tmp_path)


def test_decode_keeps_an_unclosed_image_tag_and_skips_padding_rows(tok):
    # generated text may open <img> without closing it: decoded as it is, not an error
    ids = tok.encode("see ") + [tok.img_start_id] + tok.encode("a cat")
    assert tok.decode(ids) == "see <img>a cat"
    # the embedding has 151,936 rows but the vocabulary ends at 151,859: a random model can pick such
    # an id; it has no text and must not break decoding
    assert tok.vocab_size == 151860
    assert tok.decode(tok.encode("ok") + [151900, 151935]) == "ok"
