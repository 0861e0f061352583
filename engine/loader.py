"""Finds a checkpoint's files and loads their tensors into a model built on the meta device, one
parameter at a time through that parameter's loader.

Formats, in order of preference: model.safetensors.index.json (+ shards), model.safetensors,
pytorch_model.bin.index.json (+ shards), pytorch_model.bin. safetensors files are memory-mapped;
`.bin` files load only through `torch.load(weights_only=True, mmap=True)`, so no pickled code runs.
Nothing from the model folder is imported.

Each parameter is filled by `param.weight_loader(param, weight)` (vLLM's convention; a parameter
without one takes the whole tensor: `default_weight_loader`). `weight` is a CheckpointTensor: a handle
on one tensor of an open file that reads it whole (`load`) or only a slice (`narrow`: from a
safetensors file, only that slice's bytes are read), already converted to the engine's dtype and
device; a tensor already in the target dtype on the CPU is used in place, no copy. The model family
maps checkpoint names to parameter names and says which tensors the model ignores.

All key problems are found before any tensor is read and reported together: missing keys,
unexpected keys, shape mismatches; GPTQ keys get their own message.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import EngineError

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

    def get_slice(self, key, index: tuple):
        return self.f.get_slice(key)[index]


class _DictView:
    def __init__(self, state):
        self.state = state

    def keys(self):
        return list(self.state.keys())

    def shape(self, key):
        return tuple(self.state[key].shape)

    def get(self, key):
        return self.state[key]

    def get_slice(self, key, index: tuple):
        return self.state[key][index]


class CheckpointTensor:
    """One tensor of an open checkpoint file, delivered in the engine's dtype on its device."""

    def __init__(self, view, key: str, dtype: torch.dtype, device: str):
        self.view, self.key, self.dtype, self.device = view, key, dtype, device

    @property
    def shape(self) -> tuple[int, ...]:
        return self.view.shape(self.key)

    def load(self) -> torch.Tensor:
        """The whole tensor."""
        return self.view.get(self.key).to(device=self.device, dtype=self.dtype)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """tensor.narrow(dim, start, length), reading only that part of a safetensors file."""
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self.view.get_slice(self.key, index).to(device=self.device, dtype=self.dtype)


CPU_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every fresh tensor


def set_weight(param: nn.Parameter, value: torch.Tensor) -> None:
    """Fill `param` with `value`: a parameter still on the meta device becomes `value` itself (same
    object, so every module holding it sees it; no copy); a materialized one is copied into. A CPU
    value that does not start on a 64-byte boundary (a tensor inside a safetensors file is 8-byte
    aligned) is copied to one first: MKL's result for the same product differs in the last bits with
    the weight's alignment, and a model must compute the same logits from whichever file layout it
    was loaded."""
    if value.device.type == "cpu" and value.data_ptr() % CPU_ALIGNMENT:
        value = value.clone()
    if param.is_meta:
        attrs = dict(param.__dict__)  # swap_tensors swaps them too: keep the loader and its settings
        torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=False))
        param.__dict__.update(attrs)
    else:
        param.data.copy_(value)


def default_weight_loader(param: nn.Parameter, weight: CheckpointTensor) -> None:
    set_weight(param, weight.load())


def check_keys(files: list[Path], expected: dict[str, tuple], rename: Callable[[str], str | None]) -> dict[str, Path]:
    """{parameter: file} for every expected parameter; one EngineError that lists every problem
    otherwise. `rename` maps a checkpoint key to its parameter (None: a tensor the model ignores)."""
    where: dict[str, Path] = {}
    shapes: dict[str, tuple] = {}
    raw: list[str] = []
    for path in files:
        with _open(path) as view:
            for key in view.keys():
                raw.append(key)
                name = rename(key)
                if name is None:
                    continue
                where[name] = path
                shapes[name] = view.shape(key)
    folder = files[0].parent
    gptq = sorted(k for k in raw if k.endswith(GPTQ_SUFFIXES))
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


def iter_checkpoint(
    files: list[Path], rename: Callable[[str], str | None], dtype: torch.dtype, device: str
) -> Iterator[tuple[str, CheckpointTensor]]:
    """(parameter name, handle) for every tensor the model takes, file by file; each handle is valid
    until the next one is yielded from another file."""
    for path in files:
        with _open(path) as view:
            for key in view.keys():
                name = rename(key)
                if name is not None:
                    yield name, CheckpointTensor(view, key, dtype, device)


def load_weights(
    model: nn.Module,
    model_path: str | Path,
    dtype: torch.dtype,
    device: str,
    rename: Callable[[str], str | None],
    progress: bool = False,
) -> None:
    """Fill a meta-device `model` with the checkpoint's tensors, converted to dtype, on device, each
    through its parameter's weight_loader. A parameter's `checkpoint_shape` (when its loader takes
    a slice or reshapes) is the shape the checkpoint must have; else the parameter's own."""
    from tqdm import tqdm

    files = checkpoint_files(model_path)
    params = dict(model.named_parameters())
    check_keys(files, {name: tuple(getattr(p, "checkpoint_shape", p.shape)) for name, p in params.items()}, rename)
    bar = tqdm(total=len(params), desc="loading weights", unit="tensor", disable=not progress)
    for name, weight in iter_checkpoint(files, rename, dtype, device):
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, weight)
        bar.update()
    bar.close()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:  # a loader that did not fill its parameter: a bug, not the user's
        raise RuntimeError(f"parameters left unloaded: {', '.join(left[:SHOWN])}")
