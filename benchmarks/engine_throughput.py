"""Engine vs transformers: the same Qwen-VL workload, on the same random weights, in one process and one
run, through (a) transformers the way lmms-eval / VLMEvalKit run Qwen-VL (per batch: the vision tower
computes the images' features, no cache, its attention as the original visual.py's bmm/softmax/bmm; they replace the 256 image slots of Qwen2's input embeddings;
transformers' Qwen2ForCausalLM, holding the Qwen-VL language weights, runs `generate(inputs_embeds=...)`
greedily, left-padded) at batch 1 and at several batch sizes, and (b) the bundled engine
(`LLM.generate` of every request at once, through its public API and whatever its scheduling is).

    python benchmarks/engine_throughput.py [--workload textvqa|caption|both] [--quick]
        [--requests 256] [--images 160] [--caption_images 64] [--hf_batches 1,8,16,32] [--engine_batch 64]
        [--device cpu|cuda] [--shape reduced|tiny|small|full] [--threads N] [--rounds N] [--checkpoint_dir DIR]

Workloads: TextVQA-shaped (256 requests over 160 distinct 448x448 images, one or two ~40-token
questions per image, adjacent as in TextVQA's val split, `<img>path</img>question Answer:`, 10 new
tokens) and caption-shaped (64 images, "Generate the caption in English:", 30 new tokens). Every
request generates exactly its new tokens (min_tokens = max_tokens, greedy), so both systems do the
same work. --quick: 32 requests over 20 images and 16 caption images.

Targets. On this CPU (2 cores; shape "reduced": the real 151,936-row vocabulary, hidden 256, 4 layers,
vision width 128 / 2 layers, fp32): on TextVQA the engine's requests/s >= 2x transformers at batch 1
and >= 1.2x its best batch size; on the caption workload >= 1.3x its best batch size; the engine's
batch-1 decode >= 50% of the memory-bandwidth roofline. On an H100/H200 (shape "full": Qwen-VL's,
bf16): >= 10x transformers at batch 1, and the engine's batch-1 decode >= 70% of the roofline.

Measured: requests/s and generated tokens/s over the whole workload (image loading and preprocessing
included for both); TTFT from the start of the workload (all requests available at t=0, as in an
offline eval) to the request's first token (engine: RequestOutput.first_token_time; transformers: a
logits processor's first call in the request's batch, i.e. the batch's prefill end); peak memory of
each phase with only that system loaded (the baseline runs first on its own copy of the engine's
vision-tower module and is deleted before the engine is built): host RSS high-water mark reset per
phase through /proc/self/clear_refs, on CUDA max_memory_allocated reset per phase; the roofline
fraction = (language weight bytes read per decode step, the embedding table excluded) / (batch-1
seconds per decode token) / (device copy bandwidth: 2 x bytes of a 1 GiB copy / its best time of 3).
Token agreement: the engine's greedy ids vs each transformers setting's, per request (identical in
fp32 is expected; reported, not enforced). Checkpoints are written by engine_generate's writer in a
child process. On a loaded host (see the host CPU wait column), --rounds N keeps each setting's
fastest of N runs (fresh images each round) and --threads 1 avoids OpenMP stalls.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_generate  # noqa: E402
from engine_generate import device_name, percentile, shape_config  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text",
          "immunohistochemistry", "hubble_deep_field", "retina", "clock", "colorwheel", "cell")  # fmt: skip
ASKS = ("what is written on the", "what brand is shown on the", "what number appears on the",
        "which word is printed on the", "what time is shown on the", "what is the name on the",
        "what color is the lettering on the", "what year is written on the")  # fmt: skip
THINGS = ("sign", "bottle", "jersey", "book cover", "license plate", "poster", "screen", "label",
          "storefront", "watch", "mug", "banner", "box", "door", "bus", "clock")  # fmt: skip
PLACES = ("near the left edge of the picture", "in the background behind the person", "at the top right corner",
          "on the table in front of the camera", "next to the open window", "under the bright lamp",
          "beside the parked car", "on the wall of the old building")  # fmt: skip
CONTEXT = ("Read the small print carefully", "if several words are visible give the largest one",
           "ignore any reflections on the glass", "answer with the exact spelling you see",
           "the photo was taken in the late afternoon", "some letters may be partly hidden",
           "there may be more than one object of that kind", "use digits for any numbers")  # fmt: skip
CAPTION_PROMPT = "Generate the caption in English:"


# ---- model, checkpoint ------------------------------------------------------------------------


def model_config(shape: str) -> dict:
    if shape == "reduced":
        from engine.models.qwen_vl.random_checkpoint import tiny_config

        return tiny_config(
            hidden_size=256, layers=4, heads=4, visual_width=128, visual_layers=2, visual_heads=4
        )
    return shape_config(shape)


def ensure_checkpoint(folder: Path, shape: str) -> str:
    """engine_generate's checkpoint writer with this benchmark's shapes."""
    return engine_generate.ensure_checkpoint(folder, shape, model_config(shape))


def build_llm(ckpt: Path, kwargs: dict):
    """LLM(ckpt, **kwargs), leaving out any keyword this version of the engine does not take."""
    from engine import LLM

    kwargs = dict(kwargs)
    while True:
        try:
            return LLM(ckpt, **kwargs), kwargs
        except TypeError as e:
            m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if not m or m.group(1) not in kwargs:
                raise
            print(f"note: this engine's LLM takes no {m.group(1)}=; left out")
            kwargs.pop(m.group(1))


def read_checkpoint(folder: Path, visual: bool) -> dict:
    """The checkpoint's vision (`visual`) or language tensors, read straight from its safetensors files."""
    from safetensors import safe_open

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith("transformer.visual.") == visual:
                    state[key] = f.get_tensor(key)
    if not state:
        raise SystemExit(f"{folder}: no safetensors weights for the baseline to read")
    return state


def build_vision(ckpt: Path, dtype, device: str):
    """A copy of the engine's vision tower module holding the checkpoint's vision weights, its
    attention computed the way Qwen-VL's visual.py does under transformers (bmm, softmax, bmm: the
    engine's tower uses torch's fused SDPA); the baseline runs it per batch, with no cache."""
    import torch

    from engine.models.qwen_vl.config import QwenVLConfig
    from engine.models.qwen_vl.vision import VisionTransformer, VisualAttention

    cfg = QwenVLConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        tower = VisionTransformer(cfg.visual)
    prefix = "transformer.visual."
    state = {
        k[len(prefix) :]: v.to(device=device, dtype=dtype) for k, v in read_checkpoint(ckpt, True).items()
    }
    tower.load_state_dict(state, strict=True, assign=True)
    for p in tower.parameters():
        p.requires_grad_(False)
    for module in tower.modules():
        if isinstance(module, VisualAttention):
            module.fused = False
    return tower.eval(), cfg.visual.image_size


def build_qwen2(ckpt: Path, dtype, device: str, attn: str):
    """transformers' Qwen2ForCausalLM with the checkpoint's language weights, mapped as
    tests/test_qwen_vl_fidelity.py does (q/k/v from c_attn with bias, o_proj = attn.c_proj, gate =
    w2, up = w1, down = mlp.c_proj), read from the checkpoint files, not from the engine."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    if c.get("rotary_pct", 1.0) != 1.0 or not c.get("no_bias", True):
        raise SystemExit("the Qwen2 mapping needs rotary_pct 1.0 and no_bias true")
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
    state = read_checkpoint(ckpt, False)
    mapped = {
        "model.embed_tokens.weight": state.pop("transformer.wte.weight"),
        "model.norm.weight": state.pop("transformer.ln_f.weight"),
        "lm_head.weight": state.pop("lm_head.weight"),
    }
    for i in range(c["num_hidden_layers"]):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = state.pop(src + "attn.c_attn.weight").chunk(3, dim=0)
        qb, kb, vb = state.pop(src + "attn.c_attn.bias").chunk(3, dim=0)
        mapped |= {
            dst + "input_layernorm.weight": state.pop(src + "ln_1.weight"),
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.q_proj.bias": qb,
            dst + "self_attn.k_proj.bias": kb,
            dst + "self_attn.v_proj.bias": vb,
            dst + "self_attn.o_proj.weight": state.pop(src + "attn.c_proj.weight"),
            dst + "post_attention_layernorm.weight": state.pop(src + "ln_2.weight"),
            dst + "mlp.gate_proj.weight": state.pop(src + "mlp.w2.weight"),
            dst + "mlp.up_proj.weight": state.pop(src + "mlp.w1.weight"),
            dst + "mlp.down_proj.weight": state.pop(src + "mlp.c_proj.weight"),
        }
    if state:
        raise SystemExit(f"language tensors not mapped onto Qwen2: {sorted(state)[:5]}")
    del state
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    model.load_state_dict(mapped, strict=True)
    del mapped
    return model.eval()


# ---- workload ---------------------------------------------------------------------------------


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """`count` distinct 448x448 JPEGs: skimage photos, each variant a deterministic crop, flip, channel
    order and colour shift (another `seed` gives other pictures)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for name in PHOTOS:
        a = getattr(data, name)()
        bases.append(Image.fromarray(a.astype(np.uint8)).convert("RGB"))
    paths = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        img = bases[i % len(bases)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.55, 1.0))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        img = img.crop((x, y, x + side, y + side)).resize((448, 448), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        a = np.asarray(img).astype(np.float32)[
            :, :, list(rng.choice([(0, 1, 2), (2, 1, 0), (1, 0, 2), (0, 2, 1)]))
        ]
        a = a * np.array([rng.uniform(0.75, 1.25) for _ in range(3)]) + rng.uniform(-25, 25)
        path = folder / f"img_{seed}_{i:04d}.jpg"
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def make_question(tokenizer, i: int, tokens: int = 40) -> str:
    rng = random.Random(1000 + i)
    words = f"{rng.choice(ASKS).capitalize()} {rng.choice(THINGS)} {rng.choice(PLACES)}?".split()
    clauses = list(CONTEXT)
    rng.shuffle(clauses)
    extra = " ".join(f"{c[0].upper()}{c[1:]}." for c in clauses).split()
    text = " ".join(words)
    for word in extra:
        if len(tokenizer.encode(text)) >= tokens:
            break
        text += " " + word
    return text


@dataclass
class Workload:
    name: str
    images: list[str]  # one path per request
    prompts: list[str]  # "<img>path</img>... Answer:" raw Qwen-VL queries
    new_tokens: int


def textvqa_workload(tokenizer, photos: list[str], requests: int) -> Workload:
    """`requests` questions over the images, one or two per image (TextVQA val has ~1.6), those about
    one image adjacent."""
    n = len(photos)
    twice = min(max(requests - n, 0), n)
    order = []
    for j in range(n):
        order += [j] * (2 if j < twice else 1)
    while len(order) < requests:
        order += list(range(n))
    order = order[:requests]
    images = [photos[j] for j in order]
    prompts = [f"<img>{p}</img>{make_question(tokenizer, i)} Answer:" for i, p in enumerate(images)]
    return Workload("textvqa", images, prompts, 10)


def caption_workload(photos: list[str]) -> Workload:
    return Workload("caption", list(photos), [f"<img>{p}</img>{CAPTION_PROMPT}" for p in photos], 30)


# ---- phases: memory and CPU time -------------------------------------------------------------


def proc_kib(key: str, path: str = "/proc/self/status") -> int | None:
    """A `key:  N kB` figure of a /proc file (this process's status, or /proc/meminfo), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them resident otherwise,
    and a later phase's allocations would not show in its RSS)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_pressure_us() -> int | None:
    """/proc/pressure/cpu's 'some' total: microseconds during which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.split("total=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def reset_host_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def loadavg() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


class Phase:
    """One measured phase: its peak memory (host: VmHWM, reset at the start through
    /proc/self/clear_refs; CUDA: max_memory_allocated, reset) and this process's CPU seconds."""

    def __init__(self, device: str):
        self.device = device
        self.process_peak = 0  # bytes: the host RSS high-water mark over every phase

    def host_peak(self) -> int:
        self.process_peak = max(self.process_peak, (proc_kib("VmHWM") or 0) * 1024)
        return self.process_peak

    def start(self) -> None:
        import torch

        release_memory()
        self.host_peak()
        self.resettable = reset_host_peak()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = os.times()
        self.cpu0 = t.user + t.system
        self.psi0, self.wall0 = cpu_pressure_us(), time.perf_counter()

    def cpu_wait(self) -> float | None:
        """Share of the phase during which some task on the host waited for a CPU (PSI 'some')."""
        now = cpu_pressure_us()
        if now is None or self.psi0 is None:
            return None
        return (now - self.psi0) / 1e6 / max(time.perf_counter() - self.wall0, 1e-9)

    def cpu_seconds(self) -> float:
        t = os.times()
        return t.user + t.system - self.cpu0

    def peak(self) -> float | None:
        """Bytes: the phase's peak CUDA allocation, or on a host its peak RSS (None if not resettable)."""
        import torch

        host = proc_kib("VmHWM")
        self.host_peak()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated())
        return float(host * 1024) if self.resettable and host is not None else None


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- the two systems --------------------------------------------------------------------------


@dataclass
class Result:
    system: str
    batch: str
    wall: float
    cpu: float
    requests: int
    tokens: int
    ttft: list[float]
    memory: float | None  # bytes: the phase's peak (host RSS, or CUDA allocated)
    cpu_wait: float | None  # share of the phase some task on the host waited for a CPU
    token_ids: list[list[int]] = field(default_factory=list)
    note: str = ""


def run_engine(llm, wl: Workload, phase: Phase, batch: int) -> Result:
    from engine import SamplingParams
    from engine.device import synchronize

    params = SamplingParams(max_tokens=wl.new_tokens, min_tokens=wl.new_tokens)
    counters0 = cache_counters(llm)
    phase.start()
    synchronize(llm.config.device)
    t0 = time.perf_counter()
    outs = llm.generate(wl.prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    memory = phase.peak()
    bad = [o for o in outs if o.finish_reason == "error" or o.first_token_time is None]
    if bad:
        raise SystemExit(f"engine: {len(bad)} request(s) failed, e.g. {bad[0].error or bad[0].finish_reason}")
    ttft = [o.first_token_time - t0 for o in outs]
    own = [o.ttft for o in outs]
    note = (f"RequestOutput.ttft (from each request's arrival in generate) p50 {percentile(own, 50):.2f} s, "
            f"p99 {percentile(own, 99):.2f} s")  # fmt: skip
    counters = {k: v - counters0[k] for k, v in cache_counters(llm).items() if k in counters0}
    if "prefix_hit_tokens" in counters:
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        note += f"; prefix cache: {counters['prefix_hit_tokens']:,} of {prompt:,} prompt tokens reused"
    if "image_hits" in counters:
        note += f"; image-feature cache counters: {counters['image_hits']} hits, {counters['image_misses']} misses"
    return Result("engine", f"max {batch}", wall, phase.cpu_seconds(), len(outs), sum(len(o.token_ids) for o in outs),
                  ttft, memory, phase.cpu_wait(), [list(o.token_ids) for o in outs], note)  # fmt: skip


def cache_counters(llm) -> dict[str, int]:
    """The engine's cache counters (LLMEngine.stats)."""
    stats = llm.llm_engine.stats()
    return {"prefix_hit_tokens": stats.prefix_cache_hit_tokens, "image_hits": stats.image_cache_hits,
            "image_misses": stats.image_cache_misses}  # fmt: skip


class FirstCall:
    """A logits processor that only notes when generate first asks for logits (the prefill's end)."""

    def __init__(self, device: str):
        self.device, self.time = device, None

    def __call__(self, input_ids, scores):
        if self.time is None:
            from engine.device import synchronize

            synchronize(self.device)
            self.time = time.perf_counter()
        return scores


class HFBaseline:
    """Per batch: preprocess the images, run the vision tower (no cache), build Qwen2's inputs_embeds
    with the features in the 256 image slots, left-pad, `generate` greedily."""

    def __init__(self, qwen2, vision, tokenizer, image_size: int, device: str, dtype):
        self.model, self.encode_images, self.tok = qwen2, vision, tokenizer
        self.image_size, self.device, self.dtype = image_size, device, dtype

    def inputs(self, wl: Workload, idx: list[int]):
        """Left-padded inputs_embeds [B, L, hidden] and attention_mask [B, L] for requests `idx`."""
        import torch

        from engine.models.qwen_vl.processor import preprocess
        from engine.models.qwen_vl.tokenizer import IMG_SPAN

        pixels = preprocess([wl.images[i] for i in idx], self.image_size).to(self.device)
        features = self.encode_images(pixels).to(self.dtype)  # [B, 256, hidden]
        ids = [self.tok.encode(wl.prompts[i]) for i in idx]
        length = max(len(x) for x in ids)
        embed = self.model.get_input_embeddings()
        embeds = torch.zeros(len(idx), length, embed.weight.shape[1], dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(idx), length, dtype=torch.long, device=self.device)
        for b, seq in enumerate(ids):
            pad = length - len(seq)
            rows = embed(torch.tensor(seq, device=self.device))
            start = seq.index(self.tok.img_start_id)
            rows[start + 1 : start + 1 + IMG_SPAN] = features[b]
            embeds[b, pad:] = rows
            mask[b, pad:] = 1
        return embeds, mask

    def generate(self, embeds, mask, new_tokens: int, first: FirstCall | None = None) -> list[list[int]]:
        from transformers import GenerationConfig, LogitsProcessorList

        eod = self.tok.eod_id
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=eod, pad_token_id=eod, bos_token_id=None)  # fmt: skip
        processors = LogitsProcessorList([first] if first else [])
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                                  logits_processor=processors)  # fmt: skip
        return out[:, -new_tokens:].tolist()  # with inputs_embeds only, generate returns the new tokens

    def run(self, wl: Workload, batch: int, phase: Phase) -> Result:
        import torch

        from engine.device import synchronize

        n = len(wl.prompts)
        ttft: list[float] = []
        token_ids: list[list[int]] = []
        phase.start()
        synchronize(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, batch):
                idx = list(range(s, min(n, s + batch)))
                first = FirstCall(self.device)
                embeds, mask = self.inputs(wl, idx)
                token_ids += self.generate(embeds, mask, wl.new_tokens, first)
                ttft += [first.time - t0] * len(idx)
        synchronize(self.device)
        wall = time.perf_counter() - t0
        memory = phase.peak()
        return Result("transformers", str(batch), wall, phase.cpu_seconds(), n, sum(len(t) for t in token_ids),
                      ttft, memory, phase.cpu_wait(), token_ids)  # fmt: skip


def fastest(results: list[Result]) -> Result:
    """The fastest of a setting's rounds; token ids stay round 0's, so every system is compared on the
    same prompts."""
    best = min(results, key=lambda r: r.wall)
    if len(results) > 1:
        walls = ", ".join(f"{r.wall:.1f}" for r in results)
        best.token_ids = results[0].token_ids
        best.note = "; ".join(
            x for x in (best.note, f"fastest of {len(results)} rounds (wall s: {walls})") if x
        )
    return best


# ---- roofline ---------------------------------------------------------------------------------


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    """Bytes/s of a large on-device copy (read + write) into an already-touched buffer, best of 3."""
    import torch

    from engine.device import synchronize

    x = torch.ones(int(gib * 2**30), dtype=torch.uint8, device=device)
    y = torch.zeros_like(x)  # touched: a fresh clone's page faults would dominate on a host
    best = float("inf")
    for _ in range(4):  # the first is a warm-up
        synchronize(device)
        t0 = time.perf_counter()
        y.copy_(x)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del x, y
    gc.collect()
    return 2 * gib * 2**30 / best


def engine_decode_step(llm, prompt: str, tokens: int = 32, rounds: int = 3) -> float:
    """Seconds per decode token of one request alone: RequestOutput.decode_time_per_token, best of
    `rounds` after a warm-up."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=tokens + 1, min_tokens=tokens + 1)
    llm.generate([prompt], SamplingParams(max_tokens=3, min_tokens=3), use_tqdm=False)
    return min(llm.generate([prompt], params, use_tqdm=False)[0].decode_time_per_token for _ in range(rounds))


def hf_decode_step(hf: HFBaseline, wl: Workload, tokens: int = 32, rounds: int = 3) -> float:
    """Batch 1: (time of generate with 1 + tokens new tokens - time with 1) / tokens, each best of
    `rounds` after a warm-up (the features computed once, outside the timing)."""
    import torch

    from engine.device import synchronize

    with torch.inference_mode():
        embeds, mask = hf.inputs(wl, [0])
        hf.generate(embeds, mask, 3)
        times = {}
        for n in (1, tokens + 1):
            best = float("inf")
            for _ in range(rounds):
                synchronize(hf.device)
                t0 = time.perf_counter()
                hf.generate(embeds, mask, n)
                synchronize(hf.device)
                best = min(best, time.perf_counter() - t0)
            times[n] = best
    return (times[tokens + 1] - times[1]) / tokens


# ---- report -----------------------------------------------------------------------------------


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def print_table(wl: Workload, engine: Result, hf: list[Result], on_cpu: bool) -> list[str]:
    """Prints the workload's table; returns its target verdicts."""
    from tabulate import tabulate

    best = max(hf, key=lambda r: r.requests / r.wall)
    b1 = next((r for r in hf if r.batch == "1"), None)
    rows = []
    for r in [engine, *hf]:
        same = sum(a == b for a, b in zip(engine.token_ids, r.token_ids, strict=True))
        first = min(8, r.requests)
        same_first = sum(a == b for a, b in zip(engine.token_ids[:first], r.token_ids[:first], strict=True))
        tag = " (best)" if r is best and len(hf) > 1 else ""
        rows.append((r.system + tag, r.batch, f"{r.requests / r.wall:,.2f}", f"{r.tokens / r.wall:,.1f}",
                     f"{percentile(r.ttft, 50):,.2f}", f"{percentile(r.ttft, 99):,.2f}", gib(r.memory),
                     f"{r.wall:,.1f}", f"{r.cpu:,.1f}", "n/a" if r.cpu_wait is None else f"{r.cpu_wait:.0%}",
                     "-" if r is engine else f"{same}/{r.requests} (first {first}: {same_first})"))  # fmt: skip
    print(f"\n== {wl.name}: {len(wl.prompts)} requests over {len(set(wl.images))} distinct 448x448 images, "
          f"{wl.new_tokens} new tokens each (greedy, min_tokens = max_tokens) ==")  # fmt: skip
    headers = ("system", "batch", "requests/s", "gen tok/s", "TTFT p50 s", "TTFT p99 s", "peak mem GiB", "wall s",
               "CPU s", "host CPU wait", "same token ids as engine")  # fmt: skip
    print(tabulate(rows, headers=headers, disable_numparse=True, colalign=("left",) + ("right",) * 10))
    for r in [engine, *hf]:
        if r.note:
            print(f"{r.system} {r.batch}: {r.note}")
    speed = engine.requests / engine.wall
    # (vs batch 1, vs the best batch) per workload; caption is decode-bound: decode is where an engine should win
    cpu_targets = {"textvqa": (2.0, 1.2), "caption": (None, 1.3)}
    targets = cpu_targets.get(wl.name, (None, None)) if on_cpu else (10.0, None) if wl.name == "textvqa" else (None, None)
    lines = []
    if b1 is not None:
        lines.append(("engine / transformers batch 1", speed / (b1.requests / b1.wall), targets[0]))
    lines.append(
        (f"engine / transformers best (batch {best.batch})", speed / (best.requests / best.wall), targets[1])
    )
    verdicts = []
    for what, ratio, target in lines:
        verdict = ""
        if target is not None:
            verdict = f"   target >= {target:g}x: {'PASS' if ratio >= target else 'FAIL'}"
            verdicts.append(f"{wl.name} {what}: {ratio:.2f}x (target >= {target:g}x) {verdict.split()[-1]}")
        print(f"{what}: {ratio:.2f}x requests/s{verdict}")
    return verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("textvqa", "caption", "both"), default="both")
    ap.add_argument(
        "--quick", action="store_true", help="32 TextVQA requests over 20 images, 16 caption images"
    )
    ap.add_argument("--requests", type=int, default=None, help="TextVQA requests (default 256)")
    ap.add_argument("--images", type=int, default=None, help="distinct TextVQA images (default 160)")
    ap.add_argument(
        "--caption_images", type=int, default=None, help="caption requests, one per image (default 64)"
    )
    ap.add_argument(
        "--hf_batches", default=None, help="transformers batch sizes (default 1,8,16,32; cuda 1,8,16,32,64)"
    )
    ap.add_argument("--engine_batch", type=int, default=None, help="engine max_batch_size (default 64)")
    ap.add_argument("--device", default=None, help="cpu, cuda[:i]; default: the best available")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 otherwise")
    ap.add_argument("--shape", choices=("reduced", "tiny", "small", "full"), default=None,
                    help="default: reduced on cpu, full otherwise")  # fmt: skip
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
    )
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every setting this many times, on fresh images each round, and keep the fastest")  # fmt: skip
    ap.add_argument("--hf_attn", default="sdpa", help="transformers attn_implementation (sdpa, eager)")
    ap.add_argument(
        "--max_model_len", type=int, default=512, help="engine max_model_len (sizes its KV cache)"
    )
    ap.add_argument(
        "--checkpoint_dir", default=None, help="default: a temp dir; reused when it holds this shape"
    )
    args = ap.parse_args()

    import torch

    from engine import SamplingParams
    from engine.device import DeviceError, resolve_device
    from engine.models.qwen_vl.tokenizer import QwenVLTokenizer

    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        raise SystemExit(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = device.startswith("cpu")
    dtype_name = args.dtype or ("float32" if on_cpu else "bfloat16")
    dtype = getattr(torch, dtype_name)
    shape = args.shape or ("reduced" if on_cpu else "full")
    requests = args.requests or (32 if args.quick else 256)
    n_images = min(args.images or (20 if args.quick else 160), requests)
    n_caption = args.caption_images or (16 if args.quick else 64)
    hf_batches = [int(b) for b in (args.hf_batches or ("1,8,16,32" if on_cpu else "1,8,16,32,64")).split(",")]
    engine_batch = args.engine_batch or 64
    names = ("textvqa", "caption") if args.workload == "both" else (args.workload,)

    started, load_start = time.perf_counter(), loadavg()
    work = Path(tempfile.mkdtemp(prefix="engine_throughput_"))
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else work / f"qwen-vl-{shape}"
    try:
        print(f"checkpoint: {ensure_checkpoint(ckpt, shape)}", flush=True)
        # every workload and the warm-up get images of their own: the engine may cache vision features
        # across generate calls, and neither a warm-up nor an earlier workload may warm them
        n_tv = n_images if "textvqa" in names else 0
        n_cap = n_caption if "caption" in names else 0
        tok = QwenVLTokenizer(ckpt)
        rounds = []  # per round, {name: Workload} on pictures of its own
        for r in range(max(1, args.rounds)):
            photos = make_images(work / "images", n_tv + n_cap, seed=r)
            wls = {}
            if "textvqa" in names:
                wls["textvqa"] = textvqa_workload(tok, photos[:n_tv], requests)
            if "caption" in names:
                wls["caption"] = caption_workload(photos[n_tv:])
            rounds.append(wls)
        wls = rounds[0]
        first = next(iter(wls.values()))
        spare = make_images(work / "images", 2, seed=len(rounds))
        warm = Workload("warm-up", spare, [f"<img>{p}</img>{CAPTION_PROMPT}" for p in spare], 2)
        bandwidth = copy_bandwidth(device)
        release_memory()
        reset_host_peak()  # the probe's 2 GiB are not the systems'
        phase = Phase(device)
        rss_base = (proc_kib("VmRSS") or 0) * 1024

        # (a) transformers, on a copy of the engine's vision tower: only one system is resident at a
        # time, so each phase's peak memory is that system's
        t = time.perf_counter()
        vision, image_size = build_vision(ckpt, dtype, device)
        qwen2 = build_qwen2(ckpt, dtype, device, args.hf_attn)
        hf_load_s = time.perf_counter() - t
        hf_weights, vision_bytes = tensor_bytes(qwen2.parameters()), tensor_bytes(vision.parameters())
        hf = HFBaseline(qwen2, vision, tok, image_size, device, dtype)
        hf_results: dict[str, list[Result]] = {name: [] for name in wls}
        for b in hf_batches:
            with torch.inference_mode():  # warm-up at this batch size
                hf.generate(*hf.inputs(first, list(range(min(b, len(first.prompts))))), 2)
            for name in wls:
                hf_results[name].append(fastest([hf.run(rw[name], b, phase) for rw in rounds]))
                print(f"transformers batch {b} {name}: {hf_results[name][-1].wall:.1f} s", flush=True)
        hf_step = hf_decode_step(hf, warm)
        del hf, qwen2, vision
        release_memory()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

        # (b) the engine
        t = time.perf_counter()
        llm, used = build_llm(ckpt, dict(dtype=dtype_name, device=device, max_batch_size=engine_batch,
                                         max_model_len=args.max_model_len, progress=False))  # fmt: skip
        load_s = time.perf_counter() - t
        named = list(llm.model.named_parameters())
        n_params = sum(p.numel() for _, p in named)
        engine_weights = tensor_bytes(p for _, p in named)
        step_bytes = tensor_bytes(p for n, p in named if ".visual." not in n and not n.endswith("wte.weight"))
        kv_caches = getattr(getattr(llm, "runner", None), "kv_caches", None)
        kv_bytes = tensor_bytes(t for pair in kv_caches for t in pair) if kv_caches else None
        llm.generate(warm.prompts, SamplingParams(max_tokens=2), use_tqdm=False)
        engine_results = {}
        for name in wls:
            engine_results[name] = fastest([run_engine(llm, rw[name], phase, engine_batch) for rw in rounds])
            print(f"engine {name}: {engine_results[name].wall:.1f} s", flush=True)
        engine_step = engine_decode_step(llm, warm.prompts[0])

        print(f"\nmachine: {os.cpu_count()} CPUs (load average at the start {load_start}), torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), transformers {__import__('transformers').__version__}, "
              f"python {platform.python_version()}, device {device}: {device_name(device)}")  # fmt: skip
        print(f"model: shape {shape} ({json.dumps(shape_summary(model_config(shape)))}), {n_params / 1e9:.3f} B "
              f"parameters, {dtype_name}")  # fmt: skip
        print(f"engine: weights {gib(engine_weights)} GiB + KV cache {gib(kv_bytes)} GiB, loaded in {load_s:.1f} s, "
              f"LLM({', '.join(f'{k}={v!r}' for k, v in used.items())})")  # fmt: skip
        print(f"transformers: Qwen2ForCausalLM {gib(hf_weights)} GiB (attn_implementation {args.hf_attn!r}) + a copy of "
              f"the engine's vision tower {gib(vision_bytes)} GiB (the original's attention) run per batch with no cache; "
              f"loaded in "
              f"{hf_load_s:.1f} s")  # fmt: skip
        mem_what = (
            "peak CUDA memory allocated" if device.startswith("cuda") else "peak host RSS of the process"
        )
        print(f"TTFT: from the start of the workload (every request available at t=0) to the request's first token. "
              f"peak mem: {mem_what} in the phase, only that system loaded (host RSS before either: "
              f"{gib(rss_base)} GiB). CPU s: this process's CPU time in the phase. host CPU wait: share of the "
              f"phase during which some task on the host waited for a CPU (/proc/pressure/cpu 'some'): other load "
              f"on the machine makes wall times noisy.")  # fmt: skip
        verdicts = []
        for name, wl in wls.items():
            verdicts += print_table(wl, engine_results[name], hf_results[name], on_cpu)

        print(f"\n== batch-1 decode vs the memory-bandwidth roofline ==\ncopy bandwidth {bandwidth / 1e9:,.1f} GB/s "
              f"(1 GiB copy, best of 3); language weights read per decode step {step_bytes / 1e9:.3f} GB (embedding "
              f"table excluded) -> roofline {step_bytes / bandwidth * 1e3:.2f} ms/token")  # fmt: skip
        roofline_target = 0.5 if on_cpu else 0.7
        for what, step in (("engine", engine_step), ("transformers", hf_step)):
            frac = step_bytes / step / bandwidth
            verdict = ""
            if what == "engine":
                verdict = f"   target >= {roofline_target:.0%}: {'PASS' if frac >= roofline_target else 'FAIL'}"
                verdicts.append(f"engine batch-1 decode: {frac:.1%} of roofline (target >= {roofline_target:.0%}) "
                                f"{verdict.split()[-1]}")  # fmt: skip
            print(f"{what}: {step * 1e3:.2f} ms/token = {step_bytes / step / 1e9:,.1f} GB/s = {frac:.1%} of the "
                  f"roofline{verdict}")  # fmt: skip
        if verdicts:
            print(f"\ntargets ({'CPU' if on_cpu else 'GPU'}):\n  " + "\n  ".join(verdicts))
        print(f"\npeak host RSS of the process over the run (bandwidth probe excluded): {gib(phase.host_peak())} GiB; "
              f"load average at the start "
              f"{load_start}, now {loadavg()}; total wall time {time.perf_counter() - started:.0f} s")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def shape_summary(config: dict) -> dict:
    v = config["visual"]
    return {"hidden": config["hidden_size"], "layers": config["num_hidden_layers"], "heads": config["num_attention_heads"],
            "vocab": config["vocab_size"], "vision_width": v["width"], "vision_layers": v["layers"]}  # fmt: skip


if __name__ == "__main__":
    main()
