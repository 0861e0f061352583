"""Protects how the engine reads a Qwen-VL checkpoint folder and sizes its KV cache:

- the four on-disk layouts (sharded / single safetensors, single / sharded .bin) load the same weights
  and give the same logits; dtype conversion both ways (bf16 <-> fp32) leaves nothing on meta;
- every broken checkpoint is one EngineError that says what is wrong: missing / unexpected keys,
  shape mismatches (all problems in one message), GPTQ keys or quantization_config, a .bin that would
  unpickle code, a missing shard, no weights, bad config.json, wrong model_type, no qwen.tiktoken;
- nothing from the model folder is ever imported (no remote code runs);
- the KV cache gets exactly num_blocks, or floor(budget / bytes per block) capped at a full batch;
  requests that cannot fit and max_model_len beyond the log-n table are refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import EngineError
from engine.models.qwen_vl.random_checkpoint import tiny_config, write_state_dict

PROMPT = "The quick brown fox jumps over the lazy dog"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def state(qwen_vl_ckpt) -> dict[str, torch.Tensor]:
    """The tensors of the session checkpoint (fp32, sharded safetensors), read back independently."""
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(qwen_vl_ckpt.glob("model-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)


def make_folder(folder: Path, source: Path, config: dict | None = None, tokenizer: bool = True) -> Path:
    """config.json (tiny_config() by default) and qwen.tiktoken linked from `source`, no weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or tiny_config(), indent=2), encoding="utf-8")
    if tokenizer:
        link(source / "qwen.tiktoken", folder / "qwen.tiktoken")
    return folder


def load(folder, **kw) -> LLM:
    kw = {
        "dtype": "float32",
        "device": "cpu",
        "block_size": 16,
        "num_blocks": 32,
        "max_model_len": 512,
        "max_batch_size": 4,
        "progress": False,
        **kw,
    }
    return LLM(folder, **kw)


def greedy_with_logits(llm: LLM, prompts) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and the logits of every step, per prompt."""
    logits: dict[int, list[torch.Tensor]] = {}
    original = llm.runner.run

    def run(seqs, *args, **kwargs):
        out = original(seqs, *args, **kwargs)
        if args or kwargs:  # not the one-row-per-sequence call `LLM.step` makes
            return out
        for row, seq in zip(out, seqs, strict=True):
            logits.setdefault(seq.request_id, []).append(row.clone())
        return out

    llm.runner.run = run
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
    finally:
        del llm.runner.run
    return [o.token_ids for o in outs], [torch.stack(logits[o.request_id]) for o in outs]


def assert_loaded(llm: LLM, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    params = dict(llm.model.named_parameters())
    assert set(params) == set(expected)
    for name, p in params.items():
        assert p.device.type == "cpu" and p.dtype == dtype, (name, p.device, p.dtype)
        assert torch.equal(p, expected[name].to(dtype)), name
    for name, b in llm.model.named_buffers():
        assert b.device.type == "cpu", name
    assert all(k.dtype == dtype and v.dtype == dtype for k, v in llm.runner.kv_caches)


# ---- formats and dtypes -----------------------------------------------------------------------------


def test_all_four_layouts_load_the_same_weights(qwen_vl_ckpt, state, tmp_path, photo_dir):
    folders = {"sharded safetensors": qwen_vl_ckpt}
    for name, fmt, shards in (
        ("safetensors", "safetensors", 1),
        ("bin", "bin", 1),
        ("sharded bin", "bin", 2),
    ):
        folder = make_folder(tmp_path / name.replace(" ", "_"), qwen_vl_ckpt)
        write_state_dict(folder, state, fmt, shards)
        folders[name] = folder
    assert {p.name for p in folders["sharded bin"].iterdir()} >= {
        "pytorch_model.bin.index.json",
        "pytorch_model-00002-of-00002.bin",
    }
    assert (folders["safetensors"] / "model.safetensors").is_file()
    assert (folders["bin"] / "pytorch_model.bin").is_file()
    prompts = [PROMPT, [{"image": str(photo_dir / "chelsea.jpg")}, {"text": "What is it?"}]]
    results = {}
    for name, folder in folders.items():
        llm = load(folder)
        assert_loaded(llm, state, torch.float32)
        results[name] = greedy_with_logits(llm, prompts)
    tokens, logits = results["sharded safetensors"]
    for name, (other_tokens, other_logits) in results.items():
        assert other_tokens == tokens, name
        assert all(torch.equal(a, b) for a, b in zip(logits, other_logits, strict=True)), name


def test_bf16_checkpoint_as_float32_and_fp32_checkpoint_as_bfloat16(qwen_vl_ckpt, state, tmp_path):
    bf16_state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    bf16 = make_folder(tmp_path / "bf16", qwen_vl_ckpt, tiny_config(dtype="bf16"))
    write_state_dict(bf16, bf16_state, "safetensors", 1)

    up = load(bf16, dtype="float32")
    assert_loaded(up, bf16_state, torch.float32)
    out = up.generate(PROMPT, SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert load(bf16, dtype="auto", num_blocks=2).config.dtype == torch.float32  # auto on CPU: float32

    down = load(qwen_vl_ckpt, dtype="bfloat16")
    assert_loaded(down, state, torch.bfloat16)
    tokens, logits = greedy_with_logits(down, [PROMPT])
    assert len(tokens[0]) == 4 and torch.isfinite(logits[0]).all()


# ---- per-parameter loaders -----------------------------------------------------------------------------

C_ATTN = "transformer.h.0.attn.c_attn.weight"


def _meta_model(folder):
    from engine.models import load_family

    family = load_family(folder)
    with torch.device("meta"):
        return family, family.build_model()


def test_a_parameter_loads_through_its_own_weight_loader(qwen_vl_ckpt, state):
    from engine.loader import load_weights, set_weight

    family, model = _meta_model(qwen_vl_ckpt)
    param = dict(model.named_parameters())[C_ATTN]
    calls = []

    def by_parts(p, weight):  # q, k and v as three slices of the fused tensor
        calls.append(weight.shape)
        rows = weight.shape[0] // 3
        set_weight(p, torch.cat([weight.narrow(0, i * rows, rows) for i in range(3)]))

    param.weight_loader = by_parts
    load_weights(model, qwen_vl_ckpt, torch.float32, "cpu", family.checkpoint_name)
    assert calls == [tuple(state[C_ATTN].shape)]
    loaded = dict(model.named_parameters())
    assert loaded[C_ATTN] is param and param.weight_loader is by_parts and not param.requires_grad
    assert all(torch.equal(p, state[name]) for name, p in loaded.items())


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_loader_takes_a_slice_without_reading_the_whole_tensor(qwen_vl_ckpt, state, tmp_path, monkeypatch, fmt):
    """What a tensor-parallel rank does: its parameter is a slice of the checkpoint's tensor (declared by
    checkpoint_shape), and from a safetensors file only that slice is read."""
    import engine.loader as loader

    folder = qwen_vl_ckpt
    if fmt == "bin":
        folder = make_folder(tmp_path / "bin", qwen_vl_ckpt)
        write_state_dict(folder, state, "bin", 1)
    family, model = _meta_model(folder)
    attn = model.get_submodule(C_ATTN.rpartition(".")[0])
    full = state[C_ATTN].shape
    half = full[0] // 2
    attn.weight = torch.nn.Parameter(torch.empty(half, full[1], device="meta"), requires_grad=False)
    attn.weight.checkpoint_shape = full
    attn.weight.weight_loader = lambda p, weight: loader.set_weight(p, weight.narrow(0, half, half))
    read_whole = []
    real_get = loader._SafetensorsView.get
    monkeypatch.setattr(loader._SafetensorsView, "get", lambda view, key: read_whole.append(key) or real_get(view, key))
    loader.load_weights(model, folder, torch.float32, "cpu", family.checkpoint_name)
    assert torch.equal(attn.weight, state[C_ATTN][half:])
    if fmt == "safetensors":
        assert C_ATTN not in read_whole and len(read_whole) == len(state) - 1
    with pytest.raises(EngineError, match=r"shape mismatches: transformer.h.0.attn.c_attn.weight: checkpoint \[384, 128\], model \[192, 128\]"):
        family, model = _meta_model(folder)
        attn = model.get_submodule(C_ATTN.rpartition(".")[0])
        attn.weight = torch.nn.Parameter(torch.empty(half, full[1], device="meta"), requires_grad=False)
        loader.load_weights(model, folder, torch.float32, "cpu", family.checkpoint_name)  # no checkpoint_shape


# ---- broken checkpoints -----------------------------------------------------------------------------


def broken(tmp_path, qwen_vl_ckpt, state, fmt="safetensors", shards=1, config=None) -> Path:
    folder = make_folder(tmp_path / "broken", qwen_vl_ckpt, config)
    write_state_dict(folder, state, fmt, shards)
    return folder


def refused(folder, *patterns: str) -> str:
    with pytest.raises(EngineError) as info:
        load(folder)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in: {message}"
    return message


def test_missing_keys_are_listed(qwen_vl_ckpt, state, tmp_path):
    gone = ["transformer.h.0.attn.c_attn.bias", "transformer.ln_f.weight"]
    folder = broken(tmp_path, qwen_vl_ckpt, {k: v for k, v in state.items() if k not in gone})
    message = refused(folder, str(folder), "2 missing keys", *gone)
    assert "unexpected" not in message and "shape" not in message


def test_many_missing_keys_are_counted(qwen_vl_ckpt, state, tmp_path):
    kept = {k: v for k, v in state.items() if not k.startswith("transformer.h.")}
    gone = len(state) - len(kept)
    assert gone > 8
    refused(broken(tmp_path, qwen_vl_ckpt, kept), f"{gone} missing keys", f"({gone - 8} more)")


def test_unexpected_keys_are_listed(qwen_vl_ckpt, state, tmp_path):
    extra = {"transformer.h.0.attn.rotary.weight": torch.zeros(4), "foo.bar": torch.zeros(2)}
    refused(broken(tmp_path, qwen_vl_ckpt, {**state, **extra}), "2 unexpected keys", *extra)


def test_ignored_buffers_are_not_unexpected(qwen_vl_ckpt, state, tmp_path):
    extra = {
        "transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
        "transformer.h.1.attn.bias": torch.ones(1, 1, 4, 4),
        "transformer.rotary_emb.inv_freq": torch.ones(16),
    }
    llm = load(broken(tmp_path, qwen_vl_ckpt, {**state, **extra}), num_blocks=2)
    assert_loaded(llm, state, torch.float32)


def test_shape_mismatch_names_key_and_both_shapes(qwen_vl_ckpt, state, tmp_path):
    key = "transformer.h.1.mlp.w1.weight"
    expected = list(state[key].shape)
    refused(
        broken(tmp_path, qwen_vl_ckpt, {**state, key: torch.zeros(expected[0], 64)}),
        "1 shape mismatches",
        f"{key}: checkpoint [{expected[0]}, 64], model {expected}",
    )


def test_all_key_problems_in_one_error(qwen_vl_ckpt, state, tmp_path):
    bad = dict(state)
    del bad["lm_head.weight"]
    bad["transformer.h.9.attn.c_attn.weight"] = torch.zeros(2)
    bad["transformer.visual.proj"] = torch.zeros(3, 3)
    folder = broken(tmp_path, qwen_vl_ckpt, bad, shards=2)
    refused(
        folder,
        "1 missing keys: lm_head.weight",
        "1 unexpected keys: transformer.h.9.attn.c_attn.weight",
        "1 shape mismatches: transformer.visual.proj: checkpoint [3, 3], model [128, 128]",
    )


def test_gptq_keys_are_refused_as_quantized(qwen_vl_ckpt, state, tmp_path):
    bad = {k: v for k, v in state.items() if k != "transformer.h.0.attn.c_attn.weight"}
    prefix = "transformer.h.0.attn.c_attn."
    bad.update(
        {
            prefix + "qweight": torch.zeros(16, 384, dtype=torch.int32),
            prefix + "qzeros": torch.zeros(1, 48, dtype=torch.int32),
            prefix + "scales": torch.zeros(1, 384, dtype=torch.float16),
            prefix + "g_idx": torch.zeros(128, dtype=torch.int32),
        }
    )
    message = refused(broken(tmp_path, qwen_vl_ckpt, bad), "GPTQ", "quantized checkpoints are not supported")
    assert "missing" not in message


def test_quantization_config_is_refused(qwen_vl_ckpt, tmp_path):
    config = tiny_config(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    refused(
        make_folder(tmp_path / "q", qwen_vl_ckpt, config),
        "config.json",
        "quantized checkpoints",
        "gptq",
        "4-bit",
        "not supported",
    )


def _plant_marker(path):  # what a malicious pickle would run on load
    Path(path).write_text("pickled code ran")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _plant_marker, (self.marker,)


class Opaque:
    pass


@pytest.mark.parametrize("kind", ["reduce", "instance", "function"])
def test_bin_with_pickled_objects_is_refused(qwen_vl_ckpt, tmp_path, kind):
    marker = tmp_path / "marker"
    value = {"reduce": Payload(str(marker)), "instance": Opaque(), "function": _plant_marker}[kind]
    folder = make_folder(tmp_path / "evil", qwen_vl_ckpt)
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "payload": value}, folder / "pytorch_model.bin")
    message = refused(folder, str(folder / "pytorch_model.bin"), "refused")
    assert "pickled code" in message or "weights_only" in message
    assert not marker.exists()
    if kind == "reduce":  # the file really is hostile: a plain torch.load runs the payload
        torch.load(folder / "pytorch_model.bin", weights_only=False)
        assert marker.read_text() == "pickled code ran"


def test_index_listing_a_missing_shard(qwen_vl_ckpt, state, tmp_path):
    folder = broken(tmp_path, qwen_vl_ckpt, state, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    refused(folder, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "not in the folder")


def test_bad_index_and_unreadable_weights(qwen_vl_ckpt, tmp_path):
    folder = make_folder(tmp_path / "idx", qwen_vl_ckpt)
    (folder / "pytorch_model.bin.index.json").write_text('{"metadata": {}}')
    refused(folder, "pytorch_model.bin.index.json", "weight_map")
    (folder / "pytorch_model.bin.index.json").unlink()
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    refused(folder, str(folder / "model.safetensors"), "not a readable safetensors file")


def test_no_weights(qwen_vl_ckpt, tmp_path):
    refused(make_folder(tmp_path / "empty", qwen_vl_ckpt), "no weights found", "config.json", "qwen.tiktoken")


def test_broken_config_json_names_file_and_line(qwen_vl_ckpt, tmp_path):
    folder = make_folder(tmp_path / "cfg", qwen_vl_ckpt)
    (folder / "config.json").write_text('{\n  "model_type": "qwen",\n  "hidden_size": 128,\n}\n')
    refused(folder, f"{folder / 'config.json'}:4:", "not valid JSON")
    (folder / "config.json").unlink()
    refused(folder, f"{folder / 'config.json'}: not found")


def test_wrong_model_type_and_text_only_qwen(qwen_vl_ckpt, tmp_path):
    refused(
        make_folder(tmp_path / "llama", qwen_vl_ckpt, tiny_config(model_type="llama")),
        "model_type 'llama' is not a model the engine runs (supported: 'qwen' = Qwen-VL",
    )
    text_only = {k: v for k, v in tiny_config().items() if k != "visual"}
    refused(make_folder(tmp_path / "qwen", qwen_vl_ckpt, text_only), "no 'visual' section")
    refused(
        make_folder(tmp_path / "unscaled", qwen_vl_ckpt, tiny_config(scale_attn_weights=False)),
        "scale_attn_weights False is not supported",
    )


def test_missing_tokenizer_vocabulary(qwen_vl_ckpt, tmp_path):
    refused(make_folder(tmp_path / "notok", qwen_vl_ckpt, tokenizer=False), "qwen.tiktoken", "not found")


# ---- no remote code ------------------------------------------------------------------------------


def test_nothing_from_the_model_folder_is_imported(qwen_vl_ckpt, tmp_path):
    folder = tmp_path / "remote-code"
    folder.mkdir()
    for f in qwen_vl_ckpt.iterdir():
        link(f, folder / f.name)
    marker = tmp_path / "imported"
    names = ["modeling_qwen", "configuration_qwen", "tokenization_qwen", "visual", "qwen_generation_utils"]
    for name in [*names, "__init__"]:
        (folder / f"{name}.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text({name!r})\n"
            "raise SystemExit('remote code ran')\n"
        )
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    path_before = list(sys.path)
    llm = load(folder, num_blocks=4)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert len(out.token_ids) == 2
    assert not marker.exists()
    assert not any(name in sys.modules for name in names)
    assert sys.path == path_before


# ---- KV cache sizing -----------------------------------------------------------------------------


def bytes_per_block(config: dict, block_size: int, element_size: int) -> int:
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * block_size * heads * head_dim * element_size


def cache_bytes(llm: LLM) -> int:
    return sum(t.numel() * t.element_size() for pair in llm.runner.kv_caches for t in pair)


def test_explicit_num_blocks_is_honoured(qwen_vl_ckpt):
    llm = load(qwen_vl_ckpt, num_blocks=7, block_size=16)
    assert llm.config.num_blocks == llm.block_manager.num_blocks == 7
    assert all(k.shape == v.shape == (7, 16, 4, 32) for k, v in llm.runner.kv_caches)
    assert cache_bytes(llm) == 7 * bytes_per_block(tiny_config(), 16, 4)

    # 7 blocks of 16 = 112 tokens: a request that needs 8 blocks is refused before any work
    prompt = " ".join(["word"] * 100)
    n = len(llm.tokenizer.encode(prompt))
    assert 1 <= 112 - n <= 20
    assert (
        len(llm.generate(prompt, SamplingParams(max_tokens=112 - n), use_tqdm=False)[0].token_ids) == 112 - n
    )
    with pytest.raises(EngineError, match=r"prompt 0: .*needs 8 KV blocks; the cache has 7"):
        llm.generate(prompt, SamplingParams(max_tokens=113 - n), use_tqdm=False)
    outs = llm.generate(
        [prompt, "Hi"],
        [SamplingParams(max_tokens=120 - n), SamplingParams(max_tokens=3)],
        use_tqdm=False,
        errors="return",
    )
    assert outs[0].finish_reason == "error" and "KV blocks" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 3
    assert llm.block_manager.num_free == 7


@pytest.mark.parametrize(
    "dtype, element_size, gb, block_size, max_batch_size, max_model_len",
    [
        ("float32", 4, 0.0005, 16, 8, 4096),
        ("bfloat16", 2, 0.0005, 16, 8, 4096),
        ("float32", 4, 0.001, 32, 4, 2048),
        ("float32", 4, 1.0, 16, 2, 100),
    ],
)
def test_kv_cache_memory_gb(qwen_vl_ckpt, dtype, element_size, gb, block_size, max_batch_size, max_model_len):
    llm = load(
        qwen_vl_ckpt,
        dtype=dtype,
        num_blocks=None,
        kv_cache_memory_gb=gb,
        block_size=block_size,
        max_batch_size=max_batch_size,
        max_model_len=max_model_len,
    )
    per_block = bytes_per_block(tiny_config(), block_size, element_size)
    cap = max_batch_size * math.ceil(max_model_len / block_size)
    expected = min(int(gb * 2**30) // per_block, cap)
    assert expected >= 1
    assert llm.config.num_blocks == llm.block_manager.num_blocks == expected
    assert cache_bytes(llm) == expected * per_block <= gb * 2**30


@pytest.mark.parametrize("procs", [1, 4])
def test_cpu_cache_takes_half_the_free_host_memory_shared_by_the_hosts_processes(qwen_vl_ckpt, monkeypatch, procs):
    import engine.kv_sizing as kv

    per_block = bytes_per_block(tiny_config(), 16, 4)
    monkeypatch.setattr(kv, "available_memory", lambda device: 800 * per_block)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(procs))  # torchrun's: processes on this host
    llm = load(qwen_vl_ckpt, num_blocks=None, max_batch_size=100, max_model_len=512)  # wants 3,200 blocks
    assert llm.config.num_blocks == 400 // procs


def test_kv_cache_budget_too_small(qwen_vl_ckpt):
    with pytest.raises(EngineError, match=r"no room for the KV cache \(kv_cache_memory_gb"):
        load(qwen_vl_ckpt, num_blocks=None, kv_cache_memory_gb=1e-6)


def test_max_model_len_limits(qwen_vl_ckpt):
    with pytest.raises(EngineError, match="max_model_len 40000 is beyond 32767"):
        load(qwen_vl_ckpt, max_model_len=40000)
    with pytest.raises(EngineError, match="max_model_len 32768 is beyond 32767"):
        load(qwen_vl_ckpt, max_model_len=32768)
    assert load(qwen_vl_ckpt, max_model_len=32767, num_blocks=2).config.max_model_len == 32767
    assert load(qwen_vl_ckpt, max_model_len=None, num_blocks=2).config.max_model_len == 8192  # the config's


def test_missing_model_folder(tmp_path):
    with pytest.raises(EngineError, match="model folder not found"):
        LLM(tmp_path / "nowhere", device="cpu")


# ---- KV sizing after a warm-up (accelerators), the seed's NPU_MEMORY_FRACTION / RESERVED_MEMORY_GB ----


def test_kv_budget_is_the_seeds_formula():
    from engine.device import MemoryInfo
    from engine.kv_sizing import kv_budget

    gib = 2**30
    # 80 GiB device, 60 free; torch holds 18 (weights + cache), so 2 are the driver context / others
    info = MemoryInfo(free=60 * gib, total=80 * gib, torch_reserved=18 * gib)
    budget, why = kv_budget(info, peak=20 * gib, fraction=0.9, reserved_gb=3)
    assert budget == 0.9 * 80 * gib - 3 * gib - 20 * gib - 2 * gib
    assert "90% of 80.00 GiB" in why and "3 GiB reserved" in why and "20.00 GiB warm-up peak" in why


def test_warm_up_sizes_the_cache_from_device_memory(qwen_vl_ckpt, monkeypatch, caplog):
    """An accelerator, simulated on cpu: the engine runs its warm-up step (the largest prefill batch,
    images through the vision tower) and sizes the cache from what the device has left."""
    import engine.kv_sizing as llm_mod
    from engine.device import MemoryInfo

    gib, mib = 2**30, 2**20
    info = MemoryInfo(free=int(1.5 * gib), total=2 * gib, torch_reserved=400 * mib)
    monkeypatch.setattr(llm_mod, "memory_info", lambda device: info)
    monkeypatch.setattr(llm_mod, "peak_memory", lambda device: 1 * gib)  # throwaway cache included
    monkeypatch.setenv("NPU_MEMORY_FRACTION", "0.8")
    monkeypatch.setenv("RESERVED_MEMORY_GB", "0.25")
    runs = []
    real_run = llm_mod.ModelRunner.run
    monkeypatch.setattr(llm_mod.ModelRunner, "run", lambda self, seqs, all_rows=False: runs.append(
        [(s.num_tokens, len(s.images)) for s in seqs]) or real_run(self, seqs, all_rows))  # fmt: skip
    encoded = []
    from engine.models.qwen_vl.language import QwenVLForCausalLM

    model_encode = QwenVLForCausalLM.encode_images
    monkeypatch.setattr(QwenVLForCausalLM, "encode_images", lambda self, px: encoded.append(len(px)) or model_encode(self, px))
    with caplog.at_level("INFO", logger="engine"):
        llm = load(qwen_vl_ckpt, num_blocks=None, max_batch_size=4, max_model_len=512, max_prefill_tokens=1100)
    assert runs == [[(275, 1)] * 4]  # 1100 tokens in 4 sequences, each with a blank image
    assert encoded == [4]  # all warm-up images in one vision-tower batch
    per_block = bytes_per_block(tiny_config(), 16, 4)
    throwaway = 4 * math.ceil(275 / 16) * per_block
    others = info.total - info.free - info.torch_reserved
    expected = int((0.8 * info.total - 0.25 * gib - (gib - throwaway) - others) // per_block)
    assert llm.config.memory_fraction == 0.8 and llm.config.reserved_memory_gb == 0.25
    assert llm.config.num_blocks == min(expected, 4 * 32)
    assert "warm-up: 1100 tokens in 4 sequences, 4 images" in caplog.text
    assert llm.runner.image_cache.misses == 0 and llm.block_manager.hit_tokens == 0  # nothing left behind
    out = llm.generate("Hello", SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert len(out.token_ids) == 3


def test_the_warm_up_uses_the_given_images(qwen_vl_ckpt, photo_dir, monkeypatch):
    """warmup_images (the seed's warm_up_image_path): the warm-up's sequences take them in turn, as a
    request's image would be prepared; one that cannot be read fails before any weight loads."""
    import engine.llm_engine as engine_mod
    from engine.models.qwen_vl.language import QwenVLForCausalLM
    from engine.models.qwen_vl.processor import normalize, resize

    photos = sorted(photo_dir.iterdir())[:2]
    seen = []
    model_encode = QwenVLForCausalLM.encode_images
    monkeypatch.setattr(QwenVLForCausalLM, "encode_images", lambda self, px: seen.append(px.clone()) or model_encode(self, px))
    load(qwen_vl_ckpt, num_blocks=None, warmup=True, max_batch_size=3, max_model_len=512, max_prefill_tokens=900,
         warmup_images=[str(p) for p in photos])  # fmt: skip
    (px,) = seen
    want = [normalize(resize(photos[i % 2], 448)) for i in range(3)]
    assert px.shape[0] == 3 and all(torch.equal(px[i].cpu().float(), want[i]) for i in range(3))
    seen.clear()
    load(qwen_vl_ckpt, num_blocks=None, warmup=True, max_batch_size=1, max_model_len=512, max_prefill_tokens=300)
    assert seen[0].unique().numel() == 3  # no images given: a blank one (one value per channel)
    monkeypatch.setattr(engine_mod, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(EngineError, match="image not found: .*nowhere.png"):
        load(qwen_vl_ckpt, warmup_images=[str(photo_dir / "nowhere.png")])


def test_memory_knobs_are_checked(qwen_vl_ckpt, monkeypatch):
    monkeypatch.setenv("NPU_MEMORY_FRACTION", "most")
    with pytest.raises(EngineError, match=r"NPU_MEMORY_FRACTION='most' is not a number"):
        load(qwen_vl_ckpt)
    monkeypatch.setenv("NPU_MEMORY_FRACTION", "1.5")
    with pytest.raises(EngineError, match=r"memory_fraction \(NPU_MEMORY_FRACTION\) must be in \(0, 1\]"):
        load(qwen_vl_ckpt)
    assert load(qwen_vl_ckpt, memory_fraction=0.5).config.memory_fraction == 0.5  # the argument wins
    monkeypatch.delenv("NPU_MEMORY_FRACTION")
    with pytest.raises(EngineError, match=r"reserved_memory_gb \(RESERVED_MEMORY_GB\) must be >= 0"):
        load(qwen_vl_ckpt, reserved_memory_gb=-1)
