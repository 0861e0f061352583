"""Tensor parallelism: process groups, and the layers a model family shards its weights with.

SPMD, the seed's way: torchrun starts one process per device and every process runs the same
program. `LLM(path, tensor_parallel_size=N)` in each of them joins the default process group (gloo on
CPU, nccl on CUDA, hccl on Ascend; formed here when the caller has not), splits the world into
groups of N consecutive ranks (world = data-parallel groups x N) and runs the model on its group,
each rank on LOCAL_RANK's device. Every rank of a group schedules the same requests the same way
and samples from the same gathered logits with the same generators (deterministic replicas), so all
of them hold the same tokens after every step and `generate` returns the same outputs everywhere.

Megatron-style layers (gpt-fast's tp.py, nano-vllm's layers): a column-parallel linear keeps 1/N of
the output features (a fused one, 1/N of each part); a row-parallel linear keeps 1/N of the input
features and all-reduces its output; the embedding and the LM head keep 1/N of the vocabulary. Each
parameter's weight_loader takes its rank's slice of the checkpoint tensor (from a safetensors file,
only that slice is read), so no rank holds the whole language model. With N = 1 they compute what
nn.Linear and nn.Embedding do (see `linear` for how a float32 product runs on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EngineError
from .loader import set_weight

DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this fails instead of hanging (MODELTEST_DIST_TIMEOUT)
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in its tensor-parallel group."""

    tp_size: int = 1
    tp_rank: int = 0
    group: Any = None  # the group's torch.distributed ProcessGroup (None when tp_size == 1)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.tp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op], group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' tensors concatenated along `dim`, in rank order, on every rank."""
        if self.tp_size == 1:
            return t
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.tp_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def min_int(self, value: int) -> int:
        """The smallest `value` over the group (every rank gets it)."""
        if self.tp_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device(self.group))
        return int(self.all_reduce(t, op="min").item())


def timeout() -> timedelta:
    raw = os.environ.get("MODELTEST_DIST_TIMEOUT", "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise EngineError(f"environment variable MODELTEST_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    return timedelta(seconds=seconds)


def _collective_device(group) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "hccl":
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


_groups: dict[tuple[int, int, str], Any] = {}


def init_tensor_parallel(tp_size: int, device: str) -> tuple[ParallelContext, str]:
    """(this rank's context, its device) for a group of tp_size processes started by torchrun. A single
    process (tp_size 1) needs nothing; more than one without torchrun's environment is one error
    saying how to launch."""
    if tp_size == 1:
        return ParallelContext(), device
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise EngineError(
            f"tensor_parallel_size={tp_size} runs one process per device: launch with "
            f"`torchrun --nproc_per_node {tp_size} your_script.py` (bash scripts/mm_run.sh does it for the harness)"
        )
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if world % tp_size:
        raise EngineError(f"tensor_parallel_size={tp_size} does not divide the {world} processes torchrun started")
    kind = device.split(":")[0]
    if kind != "cpu":
        count = getattr(torch, kind).device_count()
        if local_rank >= count:
            raise EngineError(f"process LOCAL_RANK={local_rank} has no {kind} device: {count} visible; start at most "
                              f"{count} processes per node (torchrun --nproc_per_node)")  # fmt: skip
        device = f"{kind}:{local_rank}"
        getattr(torch, kind).set_device(local_rank)
    backend = BACKENDS[kind]
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout())
    key = (world, tp_size, backend)
    if key not in _groups:  # every rank creates every group, in the same order (new_group is collective)
        groups = [dist.new_group(list(range(g, g + tp_size)), backend=backend, timeout=timeout())
                  for g in range(0, world, tp_size)]  # fmt: skip
        _groups[key] = groups
    group = _groups[key][rank // tp_size]
    return ParallelContext(tp_size, rank % tp_size, group), device


def check_divides(tp_size: int, sizes: dict[str, int], where: str) -> None:
    """One error naming every size tp_size does not divide, and the sizes that would work."""
    bad = {k: v for k, v in sizes.items() if v % tp_size}
    if bad:
        ok = [n for n in (1, 2, 4, 8, 16) if all(v % n == 0 for v in sizes.values())]
        raise EngineError(
            f"{where}: tensor_parallel_size={tp_size} does not divide "
            + ", ".join(f"{k} {v}" for k, v in bad.items())
            + f"; use one of {', '.join(map(str, ok))}"
        )


# ---- layers ------------------------------------------------------------------------------------------


GEMV_MIN_IN_FEATURES = 1024  # a single float32 row on CPU: MKL's gemv is the faster kernel from here up
BLOCK_ELEMENTS = 1 << 17  # W x^T is computed in blocks of output features of about this many results
SMALL_WEIGHT = 1 << 20  # elements: below this a product costs its dispatch, not its bytes; F.linear's is the shorter


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, as F.linear; for float32 rows on CPU, as (W x^T)^T.

    MKL's gemm with the weight transposed (what F.linear asks for) is slow for few rows: with the real
    151,936-row vocabulary and hidden 256, the LM head for 2 rows took 37 ms that way and 4.8 ms as
    W x^T on a 2-core CPU, and W x^T was as fast or faster for every row count and shape measured
    (4096x4096: 3.1 against 6.8 ms at 2 rows, 85 against 90 ms at 512); bfloat16 goes through
    oneDNN, where F.linear is the faster, so it stays. W x^T comes out [out, rows]: it is computed in
    blocks of output features whose [block, rows] result stays in cache while it is transposed into
    place (the LM head for 64 rows: 82 ms transposing the whole result, 54 ms by blocks; F.linear
    75 ms); the blocks give the same bits as one product. One row with few input features goes as two
    (the row twice, one result kept): gemv over short rows ran at a fifth of the bandwidth (21.6
    against 3.8 ms); from GEMV_MIN_IN_FEATURES up gemv is the faster and is used. Weights under
SMALL_WEIGHT elements (768x256: 0.02 against 0.06 ms for a row) go through F.linear. The product
    depends on how the weight's memory is aligned, so the loader puts every CPU weight on a 64-byte
    boundary (`loader.set_weight`)."""
    rows = x.shape[0] if x.dim() == 2 else 0
    if (not rows or x.device.type != "cpu" or x.dtype != torch.float32 or weight.numel() < SMALL_WEIGHT
            or rows == 1 and x.shape[1] >= GEMV_MIN_IN_FEATURES):  # fmt: skip
        return F.linear(x, weight, bias)
    xt = (x if rows > 1 else x.repeat(2, 1)).T  # [in, rows (at least 2)]
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype)
    block = max(1024, 1 << (BLOCK_ELEMENTS // xt.shape[1]).bit_length() - 1)
    for start in range(0, weight.shape[0], block):
        out[:, start : start + block] = torch.mm(weight[start : start + block], xt)[:, :rows].T
    return out if bias is None else out.add_(bias)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with each rank holding 1/N of the output features (its output stays sharded).
    `parts`: the output is a concatenation of parts (a fused q|k|v) and each part is split."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext,
                 parts: int = 1):  # fmt: skip
        super().__init__()
        self.ctx, self.parts = ctx, parts
        local = out_features // ctx.tp_size
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.weight.checkpoint_shape = (out_features, in_features)
        self.weight.weight_loader = self._load
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(local))
            self.bias.checkpoint_shape = (out_features,)
            self.bias.weight_loader = self._load

    def _load(self, param: nn.Parameter, weight) -> None:
        if self.ctx.tp_size == 1:
            set_weight(param, weight.load())
            return
        part = weight.shape[0] // self.parts  # rows of one part in the checkpoint
        size = part // self.ctx.tp_size
        start = self.ctx.tp_rank * size
        set_weight(param, torch.cat([weight.narrow(0, p * part + start, size) for p in range(self.parts)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with each rank holding 1/N of the input features (its input is the sharded output
    of a column-parallel layer); the partial products are summed over the group."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.weight = nn.Parameter(torch.empty(out_features, in_features // ctx.tp_size))
        self.weight.checkpoint_shape = (out_features, in_features)
        self.weight.weight_loader = self._load
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # whole on every rank

    def _load(self, param: nn.Parameter, weight) -> None:
        if self.ctx.tp_size == 1:
            set_weight(param, weight.load())
            return
        size = weight.shape[1] // self.ctx.tp_size
        set_weight(param, weight.narrow(1, self.ctx.tp_rank * size, size).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return linear(x, self.weight, self.bias)
        y = self.ctx.all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary rows: each rank looks up the ids in its range (zeros for
    the others) and the group sums the rows."""

    def __init__(self, num_embeddings: int, dim: int, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.per_rank = num_embeddings // ctx.tp_size
        self.start = ctx.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))
        self.weight.checkpoint_shape = (num_embeddings, dim)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, weight) -> None:
        if self.ctx.tp_size == 1:
            set_weight(param, weight.load())
        else:
            set_weight(param, weight.narrow(0, self.start, self.per_rank))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.ctx.all_reduce(rows.masked_fill(outside[:, None], 0.0))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection split by vocabulary rows: each rank computes its slice of the logits and
    the group gathers them, so every rank holds the whole [rows, vocab]."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_gather(linear(hidden, self.weight), dim=-1)


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise EngineError(f"environment variable {name}={value!r} is not a whole number (torchrun sets it)") from None
