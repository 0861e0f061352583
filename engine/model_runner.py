"""Turns a scheduled batch into the packed tensors one model step needs, runs the model, and returns
the logits of each sequence's last position.

Packing: the new tokens of all sequences in the step — a whole prompt for a sequence being
prefilled (or recomputed after a preemption), or one chunk of it with chunked prefill (attending to
the earlier chunks' K/V in the cache, as after a prefix-cache hit), one token for a decoding one —
go along one dimension ([tokens]). Positions, the sequence row of every token, KV-cache slots (through each sequence's
block table) and the rows whose logits are sampled are computed for the whole batch with a few
array operations on the host, then copied to the device once per tensor (from pinned memory on
accelerators). The model family derives what its layers need from them once per step
(`step_context`: Qwen-VL's rotary cos/sin with each sequence's own NTK factor, log-n factors). Every
image whose span has slots among the new tokens goes through the vision tower in one batch (or comes
from the feature cache) and its features replace those slots' embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attention import AttentionMetadata, get_attention_backend
from .block_manager import BlockManager, blocks_for
from .cuda_graphs import DecodeGraphs, cuda_capture
from .image_cache import FeatureCache
from .models.base import CausalLM, ImageSpan, ModelSpec
from .sequence import Sequence


@dataclass
class StepInputs:
    """One packed step, on the device."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    token_seq: torch.Tensor  # [tokens]: the row (in the step) of each token's sequence
    logits_indices: torch.Tensor  # [rows]: packed rows whose logits are returned
    attn: AttentionMetadata
    images: list[ImageSpan]  # the images with slots among the new tokens, in order
    image_rows: torch.Tensor | None  # [rows] packed rows that take image features
    feature_rows: torch.Tensor | None  # [rows] rows of the images' concatenated features they take (None: all)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        spec: ModelSpec,
        block_manager: BlockManager,
        dtype: torch.dtype,
        device: str,
        attention_backend: str | None = None,
        image_cache_bytes: int = 0,
        scratch_blocks: int = 0,
    ):
        self.model, self.spec, self.block_manager, self.dtype, self.device = model, spec, block_manager, dtype, device
        self.block_size = block_manager.block_size
        # scratch blocks (after the block manager's): where decode graphs' padding rows write their K/V
        shape = (block_manager.num_blocks + scratch_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        # kv_caches[layer] = (k, v), each [num_blocks (+ scratch), block_size, kv_heads, head_dim]
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)
        ]
        self.attention = get_attention_backend(device, attention_backend)
        self.image_cache = FeatureCache(image_cache_bytes)
        self.pin = not device.startswith("cpu")
        self.graphs: DecodeGraphs | None = None

    @staticmethod
    def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.startswith("cpu"):
            return t
        if self.pin:
            try:
                t = t.pin_memory()
            except RuntimeError:  # a backend without a pinned host allocator: plain copies
                self.pin = False
        return t.to(self.device, non_blocking=self.pin)

    def prepare(self, seqs: list[Sequence], all_rows: bool = False) -> StepInputs:
        """The packed inputs of one step: each sequence computes its tokens from `num_cached` to
        `step_end` (the end of its prompt chunk with chunked prefill, else all of them)."""
        n = len(seqs)
        starts = np.fromiter((s.num_cached for s in seqs), dtype=np.int64, count=n)
        ends = np.fromiter((s.step_end for s in seqs), dtype=np.int64, count=n)
        qlens = ends - starts
        total = int(qlens.sum())
        if total == n:  # every sequence decodes one token
            input_ids = np.fromiter((s.last_token_id for s in seqs), dtype=np.int64, count=n)
        else:
            ids: list[int] = []
            for s, a, b in zip(seqs, starts.tolist(), ends.tolist(), strict=True):
                ids.extend(s.token_ids(a, b))
            input_ids = np.array(ids, dtype=np.int64)
        offsets = np.cumsum(qlens) - qlens  # first packed row of each sequence
        token_seq = np.repeat(np.arange(n, dtype=np.int64), qlens)
        positions = np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, qlens)
        width = max(len(s.block_table) for s in seqs)
        tables = np.zeros((n, width), dtype=np.int64)
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_table)] = s.block_table
        bs = self.block_size
        slots = tables[token_seq, positions // bs] * bs + positions % bs
        logits_indices = np.arange(total, dtype=np.int64) if all_rows else offsets + qlens - 1

        # pieces of image spans among the new tokens: (first packed row, first feature row, length)
        images: list[ImageSpan] = []
        pieces: list[tuple[int, int, int]] = []
        features = 0  # rows of the step's images' concatenated features so far
        for i, s in enumerate(seqs):
            if not s.images or qlens[i] == 1 and s.num_cached >= s.images[-1].start + s.images[-1].length:
                continue
            start, shift = int(starts[i]), int(offsets[i] - starts[i])  # packed row = position + shift
            for image in s.images:  # a cached prefix may hold the span's first slots already
                first, end = max(image.start, start), min(image.start + image.length, int(ends[i]))
                if first < end:  # (a prompt chunk ends before the spans that come after it)
                    images.append(image)
                    pieces.append((first + shift, features + first - image.start, end - first))
                    features += image.length
        image_rows = feature_rows = None
        if pieces:
            rows0, feats0, lengths = (np.array(x, dtype=np.int64) for x in zip(*pieces, strict=True))
            within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            image_rows = self._to_device(np.repeat(rows0, lengths) + within)
            if int(lengths.sum()) < features:  # some spans start inside a cached prefix
                feature_rows = self._to_device(np.repeat(feats0, lengths) + within)

        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots),
            block_tables=self._to_device(tables),
            context_lens=self._to_device(ends),
            query_lens=qlens.tolist(),
            context_lens_list=ends.tolist(),
            block_size=bs,
        )
        return StepInputs(self._to_device(input_ids), self._to_device(positions), self._to_device(token_seq),
                          self._to_device(logits_indices), meta, images, image_rows, feature_rows)  # fmt: skip

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], all_rows: bool = False) -> torch.Tensor:
        """fp32 logits [len(seqs), vocab] for the last position of each sequence (with `all_rows`:
        [new tokens, vocab], every position this step computes, in packing order). Each sequence
        computes its tokens from `num_cached` to `step_end`; its block table must cover them. The row
        of a sequence that computed a prompt chunk short of its end is not to be sampled."""
        step = self.prepare(seqs, all_rows)
        return self.execute(step, seqs)

    def capture_graphs(self, max_batch_size: int, max_model_len: int, state, capture=None) -> None:
        """Capture the decode graphs (engine/cuda_graphs.py) of every bucket up to max_batch_size, on
        the scratch block the cache was built with; `state` is a request state any sequence could
        have (the static step context is built with it). `capture`: cuda_capture unless given."""
        scratch = self.block_manager.num_blocks
        if self.kv_caches[0][0].shape[0] <= scratch:
            raise RuntimeError("decode graphs need the runner built with scratch_blocks=1")
        graphs = DecodeGraphs(self.model, self.kv_caches, self.attention, max_batch_size=max_batch_size,
                              max_blocks=blocks_for(max_model_len, self.block_size), block_size=self.block_size,
                              scratch_block=scratch, device=self.device, capture=capture or cuda_capture)  # fmt: skip
        rows = graphs.sizes[-1]
        positions = torch.zeros(rows, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            graphs.capture_all(self.model.step_context(positions, torch.arange(rows, device=self.device), [state] * rows))
        self.graphs = graphs

    def execute(self, step: StepInputs, seqs: list[Sequence]) -> torch.Tensor:
        context = self.model.step_context(step.positions, step.token_seq, [s.state for s in seqs])
        logits = self.graphs.run(step, context) if self.graphs is not None else None
        if logits is None:
            features = None
            if step.images:
                features = torch.cat(self._image_features(step.images))  # [rows, hidden]
                if step.feature_rows is not None:
                    features = features[step.feature_rows]
            hidden = self.model(step.input_ids, self.kv_caches, step.attn, context, self.attention, features,
                                step.image_rows)  # fmt: skip
            logits = self.model.compute_logits(hidden[step.logits_indices])
        for seq, ctx in zip(seqs, step.attn.context_lens_list, strict=True):
            seq.num_cached = ctx
            self.block_manager.register(seq)
        return logits.float()

    def _image_features(self, images: list[ImageSpan]) -> list[torch.Tensor]:
        """Features for each image: from the cache, else one vision-tower batch of the distinct new ones."""
        found = {im.key: f for im in images if (f := self.image_cache.get(im.key)) is not None}
        todo = {im.key: im.data for im in images if im.key not in found}
        if todo:
            for key, feats in zip(todo, self.model.embed_images(list(todo.values())), strict=True):
                found[key] = feats
                self.image_cache.put(key, feats)
        return [found[im.key] for im in images]
