"""Turns a scheduled batch into the packed tensors one model step needs, runs the model, and returns
the logits of each sequence's last position.

Packing: the new tokens of all sequences in the step — a whole prompt for a sequence being
prefilled (or recomputed after a preemption), one token for a decoding one — go along one dimension
([tokens]); each token gets its position, its KV-cache slot (through the sequence's block table)
and its rotary cos/sin for the sequence's own NTK factor; queries past seq_length get the
original's log-n factor. Every image whose span is among the new tokens goes through the vision
tower in one batch and its 256 features replace the 256 slots after that span's <img> token.
"""

from __future__ import annotations

import torch

from .attention import AttentionMetadata, get_attention_backend
from .block_manager import BlockManager
from .image_cache import FeatureCache
from .models.qwen_vl.language import QwenVLForCausalLM, RotaryEmbedding, StepInputs, logn_table
from .models.qwen_vl.processor import normalize
from .models.qwen_vl.tokenizer import IMG_SPAN
from .sequence import Sequence


class ModelRunner:
    def __init__(
        self,
        model: QwenVLForCausalLM,
        block_manager: BlockManager,
        dtype: torch.dtype,
        device: str,
        attention_backend: str | None = None,
        image_cache_bytes: int = 0,
    ):
        cfg = model.config
        self.model, self.block_manager, self.dtype, self.device = model, block_manager, dtype, device
        self.block_size = block_manager.block_size
        shape = (block_manager.num_blocks, self.block_size, cfg.num_attention_heads, cfg.head_dim)
        # kv_caches[layer] = (k, v), each [num_blocks, block_size, heads, head_dim]
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)
        ]
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rotary_emb_base, device)
        self.logn = logn_table(cfg.seq_length, device) if cfg.use_logn_attn else None
        self.attention = get_attention_backend(device, attention_backend)
        self.image_cache = FeatureCache(image_cache_bytes)

    @staticmethod
    def kv_bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_attention_heads * cfg.head_dim * elem

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], all_rows: bool = False) -> torch.Tensor:
        """fp32 logits [len(seqs), vocab] for the last position of each sequence (with `all_rows`:
        [new tokens, vocab], every position this step computes, in packing order). Each sequence
        computes its tokens from `num_cached` on; its block table must cover them."""
        input_ids: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_rows: list[int] = []
        cos, sin, positions_all = [], [], []
        images: list[tuple[str, torch.Tensor]] = []  # (key, pixels) of each span with slots in this step
        image_rows: list[int] = []  # packed rows that take image features
        feature_rows: list[int] = []  # which rows of the images' [n * 256, hidden] features they take
        for seq in seqs:
            tokens = seq.all_token_ids
            start = seq.num_cached
            new = tokens[start:]
            positions = list(range(start, len(tokens)))
            offset = len(input_ids)
            for key, image, img_pos in zip(seq.image_keys, seq.images, seq.image_starts, strict=True):
                first = max(img_pos + 1, start)  # the span's slots are img_pos+1 .. img_pos+256; a cached
                if first <= img_pos + IMG_SPAN:  # prefix may hold the first ones already
                    base = len(images) * IMG_SPAN - (img_pos + 1)
                    images.append((key, image))
                    image_rows.extend(range(offset + first - start, offset + img_pos + IMG_SPAN + 1 - start))
                    feature_rows.extend(range(base + first, base + img_pos + IMG_SPAN + 1))
            input_ids.extend(new)
            slots.extend(self.block_manager.slot(seq, p) for p in positions)
            query_lens.append(len(new))
            context_lens.append(len(tokens))
            logits_rows.extend(range(offset, len(input_ids)) if all_rows else [len(input_ids) - 1])
            pos = self._tensor(positions)
            c, s = self.rotary(pos, seq.ntk_alpha)
            cos.append(c)
            sin.append(s)
            positions_all.append(pos)

        max_blocks = max(len(seq.block_table) for seq in seqs)
        block_tables = self._tensor([seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in seqs])
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            block_tables=block_tables,
            context_lens=self._tensor(context_lens),
            query_lens=query_lens,
            context_lens_list=context_lens,
            block_size=self.block_size,
        )
        positions = torch.cat(positions_all)
        logn = self.logn[positions] if self.logn is not None else None
        step = StepInputs(torch.cat(cos), torch.cat(sin), logn, meta, self.attention)

        features = rows = None
        if images:
            features = self._image_features(images).flatten(0, 1)[self._tensor(feature_rows)]  # [rows, hidden]
            rows = self._tensor(image_rows)
        logits = self.model(self._tensor(input_ids), self.kv_caches, step, self._tensor(logits_rows), features, rows)
        for seq, ctx in zip(seqs, context_lens, strict=True):
            seq.num_cached = ctx
            self.block_manager.register(seq)
        return logits.float()

    def _image_features(self, images: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Features for each (key, pixels): from the cache, else one vision-tower batch of the
        distinct new images."""
        found = {key: f for key, _ in images if (f := self.image_cache.get(key)) is not None}
        todo = {key: pixels for key, pixels in images if key not in found}
        if todo:
            # requests keep resized uint8 pixels until here (a quarter of float32's bytes while they wait)
            pixels = normalize(torch.stack(list(todo.values())).to(self.device))
            computed = self.model.encode_images(pixels)
            for key, feats in zip(todo, computed, strict=True):
                found[key] = feats
                self.image_cache.put(key, feats)
        return torch.stack([found[key] for key, _ in images])
