"""Writes a Qwen-VL checkpoint with random weights in the original on-disk format: config.json with
the original keys, qwen.tiktoken (the real vocabulary, from the dashscope package), and the
original tensor names in sharded safetensors + model.safetensors.index.json or in pytorch_model.bin
files. Used by the tests, `python -m modeltest selftest` and the benchmarks: the real loading code
runs on it, without 19 GB of downloaded weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ...errors import EngineError
from .config import QwenVLConfig
from .tokenizer import VOCAB_FILE

QWEN_VOCAB = 151936  # Qwen-VL's embedding rows (151,851 tokens, padded)


def qwen_vocab_file() -> Path:
    """dashscope's copy of qwen.tiktoken, identical to the one shipped with the Qwen-VL weights."""
    try:
        import dashscope
    except ImportError:
        raise EngineError(
            "the random checkpoint needs the real Qwen vocabulary, which ships in the 'dashscope' package: "
            "pip install dashscope (it is in this project's test extra: pip install -e '.[test]')"
        ) from None
    path = Path(dashscope.__file__).parent / "resources" / VOCAB_FILE
    if not path.is_file():
        raise EngineError(f"{path}: not found in the installed dashscope package")
    return path


def tiny_config(
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int | None = None,
    seq_length: int = 2048,
    visual_width: int = 64,
    visual_layers: int = 2,
    visual_heads: int = 4,
    dtype: str = "fp32",
    **overrides,
) -> dict:
    """A config.json dict in the original layout; the defaults make a model of a few MB plus the
    151,936-row embeddings. `overrides` set any other top-level key."""
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "model_type": "qwen",
        "vocab_size": QWEN_VOCAB,
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "kv_channels": hidden_size // heads,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "seq_length": seq_length,
        "max_position_embeddings": 8192,
        "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "use_flash_attn": False,
        "no_bias": True,
        "bf16": dtype == "bf16",
        "fp16": dtype == "fp16",
        "fp32": dtype == "fp32",
        "tokenizer_type": "QWenTokenizer",
        "visual": {
            "heads": visual_heads,
            "image_size": 448,
            "image_start_id": 151857,
            "layers": visual_layers,
            "mlp_ratio": 4.9231,
            "output_dim": hidden_size,
            "patch_size": 14,
            "width": visual_width,
        },
    }
    config.update(overrides)
    return config


def random_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor the original checkpoint has, random but well-scaled (norm weights near 1, linear
    weights ~ 1/sqrt(fan_in)) so logits are far from ties and every weight matters."""
    from .language import QwenVLForCausalLM

    cfg = QwenVLConfig.from_dict(config, "random checkpoint config")
    with torch.device("meta"):
        model = QwenVLForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = ".ln_" in name or name.endswith("ln_f.weight") or ".ln_1." in name or ".ln_2." in name
        if is_norm and leaf == "weight":
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif leaf.endswith("bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        elif name.endswith(("positional_embedding", "pos_embed", "query")):
            t = 0.5 * torch.randn(shape, generator=g)
        elif name.endswith("wte.weight"):
            t = torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) == 2 else int(torch.tensor(shape[1:]).prod())
            t = torch.randn(shape, generator=g) / fan_in**0.5
        state[name] = t.to(dtype).contiguous()
    return state


def write_random_checkpoint(
    folder: str | Path,
    config: dict | None = None,
    seed: int = 0,
    fmt: str = "safetensors",
    shards: int = 2,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write config.json, qwen.tiktoken and random weights (fmt "safetensors" or "bin"; more than one
    shard adds the index file) into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_config())
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.copyfile(qwen_vocab_file(), folder / VOCAB_FILE)
    write_state_dict(folder, random_state_dict(config, seed, dtype), fmt, shards)
    return folder


def write_state_dict(folder: Path, state: dict[str, torch.Tensor], fmt: str = "safetensors", shards: int = 1) -> None:
    """Save tensors under the original file names: (model|pytorch_model)[-0000i-of-0000n].(safetensors|bin)."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be safetensors or bin, got {fmt!r}")
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    names = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for name in names:  # fill shards in key order, by bytes
        groups[min(shards - 1, done * shards // max(total, 1))].append(name)
        done += state[name].numel() * state[name].element_size()
    groups = [g for g in groups if g]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"{stem}.{ext}" if len(groups) == 1 else f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}"
        part = {k: state[k] for k in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(group, file))
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
