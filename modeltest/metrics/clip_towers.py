"""Faster, exact forwards of open_clip's standard CLIP towers, for scoring.

open_clip computes every token of every layer and returns only one row per input: the class token of the
image tower ('tok' pooling) and the EOT token of the causal text tower ('argmax' pooling). These forwards
run the same modules and weights (LayerNorms, MLP, LayerScale, projections are open_clip's own modules,
called as open_clip calls them), with three changes that leave the math as it is:

- the last block computes its query, attention output and MLP only for the pooled row (the other rows'
  outputs are never read: LayerNorm, MLP and the pooling act per row);
- attention is one packed in-projection and `F.scaled_dot_product_attention` (a fused kernel on every
  device) in place of `nn.MultiheadAttention`, with the same scale, causal mask and out-projection;
- the patch embedding, a convolution whose kernel equals its stride, is the matrix product it amounts to.

Results equal open_clip's `encode_image`/`encode_text` up to float rounding (about 1e-6 in fp32; the tests
compare them). Anything else, a model these do not recognise (ResNet towers, attention pooling, custom
blocks, HF text towers...), is left to open_clip: `image_encoder`/`text_encoder` return None for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _standard_blocks(transformer) -> bool:
    """open_clip's `Transformer` of plain self-attention `ResidualAttentionBlock`s, batch first."""
    from open_clip.transformer import ResidualAttentionBlock, Transformer
    from torch import nn

    if type(transformer) is not Transformer or not transformer.batch_first or not len(transformer.resblocks):
        return False
    for r in transformer.resblocks:
        a = getattr(r, "attn", None)
        if (
            type(r) is not ResidualAttentionBlock
            or hasattr(r, "ln_1_kv")  # cross-attention
            or not isinstance(a, nn.MultiheadAttention)
            or not a.batch_first
            or not a._qkv_same_embed_dim
            or a.in_proj_weight is None
            or a.bias_k is not None
            or a.add_zero_attn
        ):
            return False
    return True


def _attend(block, q, k, v, causal: bool = False, mask=None):
    """Multi-head attention of q [b, m, w] over k, v [b, n, w] (already projected), then the block's
    out-projection: nn.MultiheadAttention's math, with SDPA's fused kernel."""
    import torch.nn.functional as F

    attn = block.attn
    heads = attn.num_heads
    b, m, w = q.shape
    n = k.shape[1]
    q = q.view(b, m, heads, w // heads).transpose(1, 2)
    k = k.view(b, n, heads, w // heads).transpose(1, 2)
    v = v.view(b, n, heads, w // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # [b, heads, m, d]
    return attn.out_proj(out.transpose(1, 2).reshape(b, m, w))


def _block(block, x, causal: bool = False):
    """One ResidualAttentionBlock on every row of x [b, n, w]."""
    import torch.nn.functional as F

    w = x.shape[-1]
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).split(w, dim=-1)
    x = x + block.ls_1(_attend(block, q, k, v, causal=causal))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _block_rows(block, x, rows, mask=None):
    """The block's output for one row of each sequence (x [b, n, w], rows [b]): that row's query against
    every key allowed by `mask`, then its MLP. Returns [b, w]."""
    import torch
    import torch.nn.functional as F

    w = x.shape[-1]
    attn = block.attn
    h = block.ln_1(x)
    pick = torch.arange(x.shape[0], device=x.device), rows
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(h[pick][:, None], weight[:w], None if bias is None else bias[:w])  # [b, 1, w]
    k, v = F.linear(h, weight[w:], None if bias is None else bias[w:]).split(w, dim=-1)
    y = x[pick][:, None] + block.ls_1(_attend(block, q, k, v, mask=mask))
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return y[:, 0]


def _patch_embed(conv, pixels, as_matmul: bool):
    """conv(pixels) flattened to [b, patches, width]; as one matrix product when the convolution allows it
    (`as_matmul`: bias-free, kernel == stride) and the patches tile the image."""
    import torch.nn.functional as F

    b, c, height, width = pixels.shape
    if as_matmul:
        p, q = conv.kernel_size
        gh, gw = height // p, width // q
        as_matmul = (gh * p, gw * q) == (height, width)
    if not as_matmul:
        return conv(pixels).flatten(2).transpose(1, 2)
    patches = pixels.reshape(b, c, gh, p, gw, q).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * q)
    return F.linear(patches, conv.weight.reshape(conv.out_channels, -1))


def image_encoder(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """model.encode_image's equal for open_clip's ViT with class-token pooling, else None."""
    from open_clip.transformer import VisionTransformer
    from torch import nn

    v = getattr(model, "visual", None)
    if (
        type(v) is not VisionTransformer
        or v.attn_pool is not None
        or v.pool_type != "tok"
        or v.output_tokens
        or not _standard_blocks(v.transformer)
    ):
        return None
    conv = v.conv1
    as_matmul = (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == conv.stride
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
    )

    def encode(pixels):
        import torch

        if v.training:  # patch dropout; scoring runs in eval mode
            return v(pixels)
        x = _patch_embed(conv, pixels, as_matmul)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        *blocks, last = v.transformer.resblocks
        for block in blocks:
            x = _block(block, x)
        pooled = v.ln_post(_block_rows(last, x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)))
        return pooled @ v.proj if v.proj is not None else pooled

    return encode


def causal_argmax_text(model) -> bool:
    """True for open_clip's CLIP class with a causal text mask and EOT (argmax) pooling: then positions
    after a text's EOT cannot change its features, and a batch can be cut after its longest text."""
    import open_clip
    import torch

    mask = getattr(model, "attn_mask", None)
    if (
        not isinstance(model, open_clip.CLIP)
        or getattr(model, "text_pool_type", None) != "argmax"
        or mask is None
    ):
        return False
    n = mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    return mask.ndim == 2 and bool(torch.equal(torch.isneginf(mask), causal))


def _project_text(model, x):
    import torch

    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _cut_text(model, tokens):
    """open_clip's own text forward on tokens cut after the batch's longest text (other block types)."""
    import torch

    m = model
    n = tokens.shape[1]
    cast_dtype = m.transformer.get_cast_dtype()
    x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:n].to(cast_dtype)
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n].contiguous()))
    return _project_text(m, x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)])


def text_encoder(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """model.encode_text's equal for CLIP's causal text tower pooled at EOT, on tokens [b, n] cut anywhere
    after the batch's longest text (n <= the context length), else None. Blocks other than the standard
    ones run through open_clip's own transformer, still cut."""
    if not causal_argmax_text(model):
        return None
    if not _standard_blocks(model.transformer):

        def cut(tokens):
            return _cut_text(model, tokens)

        cut.lean = False
        return cut

    def encode(tokens):
        import torch

        m = model
        n = tokens.shape[1]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:n].to(cast_dtype)
        *blocks, last = m.transformer.resblocks
        for block in blocks:
            x = _block(block, x, causal=True)
        eot = tokens.argmax(dim=-1)  # EOT is the highest id
        # the EOT row's causal mask: every position up to it
        mask = (torch.arange(n, device=x.device)[None] <= eot[:, None])[:, None, None, :]  # [b, 1, 1, n]
        return _project_text(m, m.ln_final(_block_rows(last, x, eot, mask=mask)))

    encode.lean = True  # clip_towers' forward (else open_clip's transformer on cut tokens)

    return encode
