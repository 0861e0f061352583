"""Protects the numerical fidelity of the engine's Qwen-VL model against independent references, on CPU:

- the language half (paged prefill + decode through `LLM.generate`) against transformers' own
  `Qwen2ForCausalLM` loaded with the same weights (Qwen-VL's text model is Qwen2 with MHA, q/k/v bias,
  no o_proj bias, and MLP gate = w2, up = w1): last-position logits and greedy tokens;
- dynamic NTK and log-n attention past seq_length against a dense re-implementation of the original
  modeling_qwen.py forward written here (alpha decided from the prompt length, kept during decode);
- the vision tower against a dense re-implementation of the original visual.py written here (conv
  patchify, bicubic positional resize, per-head fused q|k|v split, hand-written resampler attention),
  for both the kv_proj and the identity-kv resampler, with the patches' attention fused (the engine's)
  and as the original's bmm/softmax (the benchmark baseline's);
- the tokenizer's special-token handling and more plain-text cases against dashscope's Qwen tokenizer
  (the basic cases live in test_qwen_tokenizer.py).

Nothing here compares against numbers produced by the engine itself.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.models.qwen_vl.language import ntk_alpha
from engine.models.qwen_vl.processor import preprocess
from engine.models.qwen_vl.tokenizer import IMAGE_TAGS, QwenVLTokenizer
from engine.models.qwen_vl.vision import VisualAttention, resize_pos

TOL = 1e-4
FIRST_SPECIAL = 151643  # <|endoftext|>: every id below it is a plain BPE token


# ---- shared helpers ---------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read straight from its files (not through the engine's loader)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    for path in sorted(folder.glob("*.bin")):
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    assert state, f"no weights in {folder}"
    return {k: v.float() for k, v in state.items()}


def original_ntk_alpha(prompt_len: int, seq_length: int) -> int:
    """QWenModel.forward's dynamic-NTK factor, verbatim."""
    context_value = math.log(prompt_len / seq_length, 2) + 1
    ntk = 2 ** math.ceil(context_value) - 1
    return max(ntk, 1)


def word_tokens(tok: QwenVLTokenizer, count: int = 2000) -> list[str]:
    """Plain " word" strings that are single tokens, so a prompt of n of them is exactly n tokens."""
    words = []
    for i in range(1000, 80000):
        text = tok.decode([i])
        if re.fullmatch(r" [a-z]{3,10}", text) and tok.encode(text) == [i]:
            words.append(text)
            if len(words) == count:
                break
    return words


def words_prompt(words: list[str], n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(words) for _ in range(n))


@dataclass
class Trace:
    prompt_ids: list[int]
    token_ids: list[int]
    logits: torch.Tensor  # [generated tokens, vocab]: the logits each token was picked from


def run_engine(llm, prompts: list[str], max_tokens: int) -> list[Trace]:
    """Greedy `llm.generate` over all prompts in one batch, recording every step's logits per sequence."""
    from engine import SamplingParams

    steps: dict[int, list[torch.Tensor]] = {}
    real_run = llm.runner.run

    def recording_run(seqs):
        logits = real_run(seqs)
        for seq, row in zip(seqs, logits, strict=True):
            steps.setdefault(seq.request_id, []).append(row.clone())
        return logits

    free_before = llm.block_manager.num_free
    llm.runner.run = recording_run  # an instance attribute shadowing the method; removed below
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    finally:
        del llm.runner.run
    assert llm.block_manager.num_free == free_before, "generate leaked KV blocks"
    traces = []
    for out in outs:
        assert out.finish_reason == "length" and len(out.token_ids) == max_tokens
        rows = torch.stack(steps[out.request_id])
        assert rows.shape[0] == max_tokens
        traces.append(Trace(list(out.prompt_token_ids), list(out.token_ids), rows))
    return traces


def check_against(trace: Trace, ref_logits: torch.Tensor, what: str) -> float:
    """Engine step logits vs the reference's at the same positions; greedy tokens equal the reference's
    argmax (teacher-forced greedy: with the same tokens fed back, a greedy loop of the reference would
    pick exactly these)."""
    assert ref_logits.shape == trace.logits.shape, what
    diff = (trace.logits - ref_logits).abs().max().item()
    assert diff < TOL, f"{what}: max |engine - reference| = {diff:.3g}"
    assert ref_logits.argmax(-1).tolist() == trace.token_ids, what
    return diff


# ---- 1. language model vs transformers' Qwen2ForCausalLM ---------------------------------------


@pytest.fixture(scope="module")
def ckpt_state(qwen_vl_ckpt) -> dict[str, torch.Tensor]:
    return read_state(qwen_vl_ckpt)


@pytest.fixture(scope="module")
def qwen2(qwen_vl_ckpt, ckpt_state):
    """transformers' Qwen2ForCausalLM holding the Qwen-VL checkpoint's language weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = read_config(qwen_vl_ckpt)
    assert c["seq_length"] == 2048 and c["rotary_pct"] == 1.0 and c["no_bias"] is True
    config = Qwen2Config(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"] // 2,
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_attention_heads"],
        head_dim=c["kv_channels"],
        hidden_act="silu",
        rms_norm_eps=c["layer_norm_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": float(c["rotary_emb_base"])},
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    taken: set[str] = set()

    def take(key: str) -> torch.Tensor:
        taken.add(key)
        return ckpt_state[key]

    mapped = {
        "model.embed_tokens.weight": take("transformer.wte.weight"),
        "model.norm.weight": take("transformer.ln_f.weight"),
        "lm_head.weight": take("lm_head.weight"),
    }
    for i in range(c["num_hidden_layers"]):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = take(src + "attn.c_attn.weight").chunk(3, dim=0)
        qb, kb, vb = take(src + "attn.c_attn.bias").chunk(3, dim=0)
        mapped |= {
            dst + "input_layernorm.weight": take(src + "ln_1.weight"),
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.q_proj.bias": qb,
            dst + "self_attn.k_proj.bias": kb,
            dst + "self_attn.v_proj.bias": vb,
            dst + "self_attn.o_proj.weight": take(src + "attn.c_proj.weight"),
            dst + "post_attention_layernorm.weight": take(src + "ln_2.weight"),
            dst + "mlp.gate_proj.weight": take(src + "mlp.w2.weight"),
            dst + "mlp.up_proj.weight": take(src + "mlp.w1.weight"),
            dst + "mlp.down_proj.weight": take(src + "mlp.c_proj.weight"),
        }
    language = {k for k in ckpt_state if not k.startswith("transformer.visual.")}
    assert taken == language, f"language tensors not mapped: {sorted(language - taken)}"
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def qwen2_step_logits(model, trace: Trace) -> torch.Tensor:
    """Qwen2's logits at the positions the engine picked each generated token from."""
    ids = trace.prompt_ids + trace.token_ids[:-1]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), logits_to_keep=len(trace.token_ids))
    return out.logits[0].float()


@pytest.fixture(scope="module")
def words(qwen_vl_llm) -> list[str]:
    return word_tokens(qwen_vl_llm.tokenizer)


def test_prefill_logits_match_transformers_qwen2(qwen_vl_llm, qwen2, words):
    prompts = [
        "Hello",
        "What is the brand of this camera? Answer:",
        "通义千问是阿里云研发的大规模语言模型。\n\tdef f(x): return x ** 2  # 🤖",
        words_prompt(words, 300, seed=1),
        words_prompt(words, 1500, seed=2),
    ]
    traces = run_engine(qwen_vl_llm, prompts, max_tokens=1)  # one packed prefill of all five
    lengths = [len(t.prompt_ids) for t in traces]
    assert lengths[0] == 1 and lengths[3] == 300 and lengths[4] == 1500
    for trace in traces:
        check_against(trace, qwen2_step_logits(qwen2, trace), f"prefill of {len(trace.prompt_ids)} tokens")


def test_greedy_generation_matches_transformers_qwen2(qwen_vl_llm, qwen2, words):
    # lengths around the 16-token KV block: decode writes cross block boundaries at different steps
    prompts = [words_prompt(words, n, seed=n) for n in (5, 16, 37, 250)]
    traces = run_engine(qwen_vl_llm, prompts, max_tokens=12)
    for trace in traces:
        check_against(trace, qwen2_step_logits(qwen2, trace), f"greedy after {len(trace.prompt_ids)} tokens")
    # different prompts, different continuations
    assert len({tuple(t.token_ids) for t in traces}) == len(traces)


# ---- 2. dynamic NTK and log-n attention past seq_length ----------------------------------------


def reference_qwen_logits(
    state: dict[str, torch.Tensor],
    c: dict,
    ids: list[int],
    alpha: float,
    last: int,
    logn: bool = True,
) -> torch.Tensor:
    """The original QWenLMHeadModel forward over the whole sequence (no cache), fp32, with a fixed NTK
    alpha; returns the logits of the last `last` positions."""
    hidden, heads, dim = c["hidden_size"], c["num_attention_heads"], c["kv_channels"]
    rot = dim if c["rotary_pct"] == 1.0 else int(dim * c["rotary_pct"])
    eps, seq_length, n = c["layer_norm_epsilon"], c["seq_length"], len(ids)

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def linear(x, name):
        return x @ state[name + ".weight"].T + (state[name + ".bias"] if name + ".bias" in state else 0)

    # RotaryEmbedding.update_rotary_pos_emb_cache
    base = c["rotary_emb_base"] * alpha ** (rot / (rot - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.outer(torch.arange(n).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # [n, 1, rot]

    def rotary(t):  # apply_rotary_pos_emb: [n, heads, dim]
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        x1, x2 = t_rot[..., : rot // 2], t_rot[..., rot // 2 :]
        return torch.cat((t_rot * cos + torch.cat((-x2, x1), dim=-1) * sin, t_pass), dim=-1)

    logn_list = [math.log(i, seq_length) if i > seq_length else 1 for i in range(1, 32768)]
    logn_factor = torch.tensor(logn_list[:n])[:, None, None]
    causal = torch.ones(n, n, dtype=torch.bool).tril()

    x = state["transformer.wte.weight"][torch.tensor(ids)]
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        q, k, v = linear(rms_norm(x, state[p + "ln_1.weight"]), p + "attn.c_attn").split(hidden, dim=-1)
        q, k, v = (t.reshape(n, heads, dim) for t in (q, k, v))
        q, k = rotary(q), rotary(k)
        if logn:
            q = q * logn_factor
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, n, dim]
        scores = q @ k.transpose(-1, -2) / torch.full([], dim**0.5)
        scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
        attn = (scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(n, hidden)
        x = x + linear(attn, p + "attn.c_proj")
        h = rms_norm(x, state[p + "ln_2.weight"])
        w2 = linear(h, p + "mlp.w2")
        x = x + linear(linear(h, p + "mlp.w1") * (w2 * torch.sigmoid(w2)), p + "mlp.c_proj")
    x = rms_norm(x[n - last :], state["transformer.ln_f.weight"])
    return x @ state["lm_head.weight"].T


@pytest.fixture(scope="module")
def short_llm(qwen_vl_ckpt_short):
    from engine import LLM

    return LLM(qwen_vl_ckpt_short, dtype="float32", device="cpu", max_batch_size=8, max_model_len=512,
               num_blocks=64, block_size=16, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def short_state(qwen_vl_ckpt_short) -> dict[str, torch.Tensor]:
    return read_state(qwen_vl_ckpt_short)


@pytest.mark.parametrize(
    ("length", "seq_length", "alpha"),
    [(1, 2048, 1), (2047, 2048, 1), (2048, 2048, 1), (2049, 2048, 3), (4096, 2048, 3), (4097, 2048, 7),
     (8192, 2048, 7), (8193, 2048, 15), (16384, 2048, 15), (32, 32, 1), (33, 32, 3), (100, 32, 7)],
)  # fmt: skip
def test_ntk_alpha_boundaries(length, seq_length, alpha):
    assert original_ntk_alpha(length, seq_length) == alpha
    assert ntk_alpha(length, seq_length) == alpha


def test_dynamic_ntk_and_logn_past_seq_length(short_llm, short_state, qwen_vl_ckpt_short):
    c = read_config(qwen_vl_ckpt_short)
    assert c["seq_length"] == 32 and c["use_dynamic_ntk"] and c["use_logn_attn"]
    words = word_tokens(short_llm.tokenizer, 500)
    # 20: alpha 1, no log-n; 30: alpha 1, decode crosses seq_length (log-n starts); 40: alpha 3;
    # 64: alpha 3, decode crosses 64 where a recomputed alpha would become 7; 100: alpha 7
    lengths = [20, 30, 40, 64, 100]
    steps = 8
    traces = run_engine(short_llm, [words_prompt(words, n, seed=n) for n in lengths], max_tokens=steps)
    alphas = []
    for n, trace in zip(lengths, traces, strict=True):
        assert len(trace.prompt_ids) == n
        alpha = original_ntk_alpha(n, c["seq_length"])
        alphas.append(alpha)
        ids = trace.prompt_ids + trace.token_ids[:-1]
        ref = reference_qwen_logits(short_state, c, ids, alpha, last=steps)
        check_against(trace, ref, f"prompt of {n} tokens, alpha {alpha}")
    assert alphas == [1, 1, 3, 3, 7]

    # the comparison can tell: log-n and a per-step alpha change the logits well beyond the tolerance
    t30, t64 = traces[1], traces[3]
    ids = t30.prompt_ids + t30.token_ids[:-1]
    no_logn = reference_qwen_logits(short_state, c, ids, 1, last=1, logn=False)
    assert (no_logn[0] - t30.logits[-1]).abs().max() > 100 * TOL
    ids = t64.prompt_ids + t64.token_ids[:-1]
    assert original_ntk_alpha(len(ids) + 1, c["seq_length"]) == 7
    recomputed = reference_qwen_logits(short_state, c, ids, 7, last=1)
    assert (recomputed[0] - t64.logits[-1]).abs().max() > 100 * TOL


# ---- 3. vision tower vs the original visual.py, written out densely ---------------------------


def bicubic_abs_pos(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """visual.py's get_abs_pos: a square [L, C] table resized bicubically to `tokens` positions."""
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(tokens))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def reference_vision(state: dict[str, torch.Tensor], v: dict, pixels: torch.Tensor, split: str = "per_head"):
    """The original VisionTransformer forward. `split` is how the fused in_proj rows are read:
    "per_head" (visual.py: [.., heads, 3 * head_dim], each head's q|k|v together) or "thirds"
    (all q rows, then all k, then all v)."""

    def g(name: str) -> torch.Tensor:
        return state["transformer.visual." + name]

    def layer_norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * g(name + ".weight") + g(name + ".bias")

    def linear(x, name):
        return x @ g(name + ".weight").T + g(name + ".bias")

    n, patch, width, heads = pixels.shape[0], v["patch_size"], v["width"], v["heads"]
    head_dim, grid = width // heads, v["image_size"] // v["patch_size"]
    # conv1 (stride = kernel = patch, no bias) as a matmul over flattened patches
    patches = pixels.reshape(n, 3, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
    x = patches.reshape(n, grid * grid, 3 * patch * patch) @ g("conv1.weight").reshape(width, -1).T
    length = x.shape[1]
    x = layer_norm(x + bicubic_abs_pos(g("positional_embedding"), length), "ln_pre")
    for i in range(v["layers"]):
        b = f"transformer.resblocks.{i}."
        qkv = linear(layer_norm(x, b + "ln_1"), b + "attn.in_proj")  # [n, L, 3 * width]
        if split == "per_head":
            q, k, val = qkv.view(n, length, heads, 3 * head_dim).split(head_dim, dim=-1)
        else:
            q, k, val = (t.reshape(n, length, heads, head_dim) for t in qkv.chunk(3, dim=-1))
        q, k, val = (t.transpose(1, 2) for t in (q, k, val))  # [n, heads, L, head_dim]
        probs = ((q / math.sqrt(head_dim)) @ k.transpose(-1, -2)).softmax(dim=-1)
        x = x + linear((probs @ val).transpose(1, 2).reshape(n, length, width), b + "attn.out_proj")
        h = linear(layer_norm(x, b + "ln_2"), b + "mlp.c_fc")
        x = x + linear(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), b + "mlp.c_proj")

    # Resampler: nn.MultiheadAttention(dim, dim // 128) written out from its packed parameters
    dim = v["output_dim"]
    r_heads = dim // 128
    r_dim = dim // r_heads
    kv = x @ g("attn_pool.kv_proj.weight").T if "transformer.visual.attn_pool.kv_proj.weight" in state else x
    kv = layer_norm(kv, "attn_pool.ln_kv")  # [n, L, dim]
    queries = layer_norm(g("attn_pool.query"), "attn_pool.ln_q") + g("attn_pool.pos_embed")  # [Q, dim]
    keys = kv + bicubic_abs_pos(g("attn_pool.pos_embed"), length)
    wq, wk, wv = g("attn_pool.attn.in_proj_weight").chunk(3, dim=0)
    bq, bk, bv = g("attn_pool.attn.in_proj_bias").chunk(3, dim=0)
    n_q = queries.shape[0]
    qh = (queries @ wq.T + bq).reshape(n_q, r_heads, r_dim).transpose(0, 1)  # [heads, Q, r_dim]
    kh = (keys @ wk.T + bk).reshape(n, length, r_heads, r_dim).transpose(1, 2)  # [n, heads, L, r_dim]
    vh = (kv @ wv.T + bv).reshape(n, length, r_heads, r_dim).transpose(1, 2)
    probs = (qh.unsqueeze(0) @ kh.transpose(-1, -2) / math.sqrt(r_dim)).softmax(dim=-1)  # [n, heads, Q, L]
    out = linear((probs @ vh).transpose(1, 2).reshape(n, n_q, dim), "attn_pool.attn.out_proj")
    return layer_norm(out, "ln_post") @ g("proj")


@pytest.fixture(scope="module")
def pixels(photo_dir) -> torch.Tensor:
    return preprocess([photo_dir / "astronaut.jpg", photo_dir / "coffee.png"])


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "bmm-softmax"])
@pytest.mark.parametrize("which", ["kv_proj", "identity_kv"])
def test_vision_matches_original_visual(which, fused, request, pixels, monkeypatch):
    monkeypatch.setattr(VisualAttention, "fused", fused)  # the engine's way, and the original's (benchmarks)
    if which == "kv_proj":
        llm, folder = request.getfixturevalue("qwen_vl_llm"), request.getfixturevalue("qwen_vl_ckpt")
    else:
        llm, folder = request.getfixturevalue("short_llm"), request.getfixturevalue("qwen_vl_ckpt_short")
    state, v = read_state(folder), read_config(folder)["visual"]
    assert ("transformer.visual.attn_pool.kv_proj.weight" in state) == (which == "kv_proj")
    assert (v["width"] != v["output_dim"]) == (which == "kv_proj")
    with torch.inference_mode():
        engine = llm.model.encode_images(pixels)
    ref = reference_vision(state, v, pixels)
    assert engine.shape == (2, 256, v["output_dim"]) == ref.shape
    diff = (engine - ref).abs().max().item()
    assert diff < TOL, f"max |engine - reference| = {diff:.3g}"
    assert (ref[0] - ref[1]).abs().max() > 100 * TOL, "the two photos give different features"


def test_vision_in_proj_is_split_per_head(qwen_vl_llm, qwen_vl_ckpt, ckpt_state, pixels):
    """Weights written in a q|k|v-in-thirds layout, rearranged into the per-head layout, give the engine the
    output the thirds reading gives; read directly, the two layouts give different outputs."""
    v = read_config(qwen_vl_ckpt)["visual"]
    width, heads = v["width"], v["heads"]
    head_dim = width // heads
    # per-head row h*3d + j*d + e holds thirds row j*width + h*d + e (j: 0 q, 1 k, 2 v)
    perm = [j * width + h * head_dim + e for h in range(heads) for j in range(3) for e in range(head_dim)]
    visual = copy.deepcopy(qwen_vl_llm.model.transformer.visual)
    with torch.no_grad():
        for i, block in enumerate(visual.transformer.resblocks):
            prefix = f"transformer.visual.transformer.resblocks.{i}.attn.in_proj."
            block.attn.in_proj.weight.copy_(ckpt_state[prefix + "weight"][perm])
            block.attn.in_proj.bias.copy_(ckpt_state[prefix + "bias"][perm])
    one = pixels[:1]
    with torch.inference_mode():
        engine = visual(one)
    thirds = reference_vision(ckpt_state, v, one, split="thirds")
    per_head = reference_vision(ckpt_state, v, one, split="per_head")
    assert (engine - thirds).abs().max() < TOL
    assert (thirds - per_head).abs().max() > 100 * TOL


def test_resize_pos_is_torch_bicubic():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(256, 24, generator=g)
    assert resize_pos(table, 256) is table
    grid = table.reshape(1, 16, 16, 24).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1024, 24)
    assert torch.equal(resize_pos(table, 1024), expected)
    # a low-precision table is resized in fp32 and cast back, as get_abs_pos does
    low = table.bfloat16()
    out = resize_pos(low, 1024)
    assert out.dtype == torch.bfloat16
    lowgrid = low.float().reshape(1, 16, 16, 24).permute(0, 3, 1, 2)
    ref = F.interpolate(lowgrid, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.equal(out, ref.permute(0, 2, 3, 1).reshape(1024, 24).bfloat16())


# ---- 4. tokenizer: special-token handling and more plain text vs dashscope ---------------------


@pytest.fixture(scope="module")
def tok() -> QwenVLTokenizer:
    from engine.models.qwen_vl.random_checkpoint import qwen_vocab_file

    return QwenVLTokenizer(qwen_vocab_file())


@pytest.fixture(scope="module")
def dashscope_tok():
    from dashscope import get_tokenizer

    return get_tokenizer("qwen-7b-chat")


def mixed_text(seed: int, pieces: int = 400) -> str:
    rng = random.Random(seed)
    parts = ["word", " Word", "中文", "日本語", "한국어", "ελληνικά", "🤖", "👨‍👩‍👧", "\t", "    ", "\n", "\r\n",
             "\u3000", "\u00a0", "123", "4.5e-6", "'s", "'LL", "(x)", "{}", "<|im_end|", "e\u0301", "\u0301"]  # fmt: skip
    return "".join(rng.choice(parts) for _ in range(pieces))


MORE_TEXTS = [
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский текст, العربية, हिन्दी",
    "if (x) {\n\t\tif (y) {\r\n\t\t\treturn 0;\t// done\n\t\t}\n}\n",
    "five:     tabs:\t\t\tideographic:\u3000\u3000nbsp:\u00a0\u00a0x\n\n\n\n   \t \n",
    "👨‍👩‍👧‍👦 family, 🇨🇳 flag, 👍🏽 skin tone, 1️⃣ keycap",
    "$1,234.56 / ¥7,890 / 3.5e-10; 2024-01-31T12:00:00Z https://example.com/a?b=c&d=e#f",
    "decomposed: A\u030a \u1100\u1161\u11a8; precomposed: Å 각",
    mixed_text(0),
    mixed_text(1, 3000),
]


@pytest.mark.parametrize("text", MORE_TEXTS, ids=range(len(MORE_TEXTS)))
def test_more_plain_text_matches_dashscope(tok, dashscope_tok, text):
    ids = tok.encode(text)
    assert ids == dashscope_tok.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_allowed_special_image_tags_only(tok, dashscope_tok):
    def plain(s: str) -> list[int]:  # dashscope with no special token allowed: special-token text stays text
        return dashscope_tok.encode(s, allowed_special=set())

    assert tok.encode("<|im_start|>") == [151644]
    typed = tok.encode("<|im_start|>", allowed_special=IMAGE_TAGS)
    assert typed == plain("<|im_start|>") and all(i < FIRST_SPECIAL for i in typed) and len(typed) > 1

    text = "<|im_start|>user\n<ref>the cat</ref><box>(1,2),(3,4)</box><|endoftext|> <|extra_7|>"
    ids = tok.encode(text, allowed_special=IMAGE_TAGS)
    expected = (plain("<|im_start|>user\n") + [151851] + plain("the cat") + [151852, 151853]
                + plain("(1,2),(3,4)") + [151854] + plain("<|endoftext|> <|extra_7|>"))  # fmt: skip
    assert ids == expected
    assert [i for i in ids if i >= FIRST_SPECIAL] == [151851, 151852, 151853, 151854]
    assert tok.decode(ids) == text
    # default: every special token's text is that token
    specials = [151644, 151851, 151852, 151853, 151854, 151643, 151653]
    assert [i for i in tok.encode(text) if i >= FIRST_SPECIAL] == specials
