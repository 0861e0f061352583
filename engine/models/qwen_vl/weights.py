"""Finds and loads a Qwen-VL checkpoint's tensors into a model built on the meta device.

Formats, in order of preference: model.safetensors.index.json (+ shards), model.safetensors,
pytorch_model.bin.index.json (+ shards), pytorch_model.bin. safetensors files are memory-mapped and
tensors are read one at a time straight into place (a tensor already in the target dtype on the CPU
is used in place, no copy); `.bin` files load only through `torch.load(weights_only=True, mmap=True)`,
so no pickled code runs. Nothing from the model folder is imported.

All key problems are found before any tensor is read and reported together: missing keys,
unexpected keys, shape mismatches; GPTQ keys get their own message.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ...errors import EngineError

# buffers some exports carry that the original model ignores on load
IGNORED_SUFFIXES = (".attn.masked_bias", ".attn.bias", ".rotary_emb.inv_freq")
GPTQ_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
SHOWN = 8


def checkpoint_files(model_path: str | Path) -> list[Path]:
    folder = Path(model_path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EngineError(f"{index}: not a valid shard index (needs a 'weight_map' object): {e}") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise EngineError(f"{index} lists shard(s) that are not in the folder: {', '.join(missing)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) if folder.is_dir() else "(no such folder)"
    raise EngineError(
        f"{folder}: no weights found (expected model.safetensors[.index.json] or pytorch_model.bin[.index.json]); "
        f"the folder has: {present}"
    )


@contextmanager
def _open(path: Path):
    """A {name: tensor-like} view of one file, valid inside the `with`."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                yield _SafetensorsView(f)
        except SafetensorError as e:
            raise EngineError(f"{path}: not a readable safetensors file: {e}") from None
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise EngineError(
            f"{path}: refused: this .bin holds more than tensors and would run pickled code ({e}). "
            "Convert it to safetensors with a tool you trust."
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise EngineError(f"{path}: not a readable PyTorch checkpoint: {e}") from None
    if not isinstance(state, dict):
        raise EngineError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    yield _DictView(state)


class _SafetensorsView:
    def __init__(self, f):
        self.f = f

    def keys(self):
        return list(self.f.keys())

    def shape(self, key):
        return tuple(self.f.get_slice(key).get_shape())

    def get(self, key):
        return self.f.get_tensor(key)


class _DictView:
    def __init__(self, state):
        self.state = state

    def keys(self):
        return list(self.state.keys())

    def shape(self, key):
        return tuple(self.state[key].shape)

    def get(self, key):
        return self.state[key]


def check_keys(files: list[Path], expected: dict[str, tuple]) -> dict[str, Path]:
    """{key: file} for every expected key; one EngineError that lists every problem otherwise."""
    where: dict[str, Path] = {}
    shapes: dict[str, tuple] = {}
    for path in files:
        with _open(path) as view:
            for key in view.keys():
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                where[key] = path
                shapes[key] = view.shape(key)
    folder = files[0].parent
    gptq = sorted(k for k in where if k.endswith(GPTQ_SUFFIXES))
    if gptq:
        raise EngineError(
            f"{folder}: this is a GPTQ-quantized checkpoint ({gptq[0]}, ...); quantized checkpoints are not "
            "supported yet: use the bf16/fp16 release (Qwen/Qwen-VL or Qwen/Qwen-VL-Chat)"
        )
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {list(shapes[k])}, model {list(expected[k])}"
        for k in set(expected) & set(where)
        if tuple(shapes[k]) != tuple(expected[k])
    )
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = "; ".join(items[:SHOWN]) + (f"; ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise EngineError(
            f"{folder}: the weights do not match config.json ({' | '.join(problems)}). "
            "Check that config.json belongs to these weights and that the files are complete."
        )
    return where


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with _open(path) as view:
            for key in view.keys():
                if not key.endswith(IGNORED_SUFFIXES):
                    yield key, view.get(key)


def load_weights(model: nn.Module, model_path: str | Path, dtype: torch.dtype, device: str, progress: bool = False) -> None:
    """Fill a meta-device `model` with the checkpoint's tensors, converted to dtype, on device."""
    from tqdm import tqdm

    files = checkpoint_files(model_path)
    params = dict(model.named_parameters())
    check_keys(files, {name: tuple(p.shape) for name, p in params.items()})
    bar = tqdm(total=len(params), desc="loading weights", unit="tensor", disable=not progress)
    for name, tensor in iter_checkpoint(files):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = tensor.to(device=device, dtype=dtype)
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        bar.update()
    bar.close()
