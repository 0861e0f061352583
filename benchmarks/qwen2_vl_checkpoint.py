"""A random Qwen2-VL or Qwen2.5-VL checkpoint written by transformers itself (save_pretrained), with a
byte-level BPE tokenizer trained on `corpus` (no Qwen2 vocabulary can be downloaded), a chat template
and the real image processor: what the tests (tests/conftest.py, tiny) and benchmarks/engine_qwen2_vl.py
(reduced) load. The language model's vocabulary is padded to a multiple of 8, as released ones are."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]  # fmt: skip
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
        "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


def write_qwen2_vl(out: Path, corpus: list[str], variant: str = "qwen2_vl", *, vocab: int, text: dict, vision: dict,
                   max_pixels: int, seed: int = 0) -> Path:  # fmt: skip
    """`text`: the language model's config keys (hidden_size, layers, heads, mrope_section, ...);
    `vision`: the vision tower's (Qwen2-VL's names, or Qwen2.5-VL's with variant "qwen2_5_vl")."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[3:])  # fmt: skip
    fast.chat_template = CHAT
    five = variant == "qwen2_5_vl"
    processor = (Qwen2_5_VLProcessor if five else Qwen2VLProcessor)(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels), tokenizer=fast,
        video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT)  # fmt: skip
    v = fast.get_vocab()
    config = (Qwen2_5_VLConfig if five else Qwen2VLConfig)(
        text_config=dict(vocab_size=-(-tok.get_vocab_size() // 8) * 8, bos_token_id=v["<|endoftext|>"],
                         eos_token_id=v["<|im_end|>"], pad_token_id=v["<|endoftext|>"], tie_word_embeddings=False,
                         **text),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, **vision),
        image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = (Qwen2_5_VLForConditionalGeneration if five else Qwen2VLForConditionalGeneration)(config)
    model.generation_config.eos_token_id = v["<|im_end|>"]
    model.generation_config.pad_token_id = v["<|endoftext|>"]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
