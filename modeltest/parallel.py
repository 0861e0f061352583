"""Data parallelism for the harness, and the lock on an output folder.

Under torchrun the world is dp x tp processes: ranks r = g * tp + i form data-parallel group g (the
engine makes the same groups its tensor-parallel groups, engine/distributed.py). The samples still to
do are split into dp contiguous, balanced shares (neighbouring TextVQA questions share images, so a
group keeps its prefix and image-feature caches useful); every rank of a group runs its group's
share through the backend, and the group's first rank (its leader) records the results.

Rank 0 decides and tells the others: it takes the lock, reads what earlier runs finished (resume) and
broadcasts that, so every rank computes the same shares. Leaders other than rank 0 append each result
to `samples.rank<r>.jsonl` beside samples.jsonl as it finishes (a crash loses only what is in flight);
at the end rank 0 gathers every leader's records, appends them to samples.jsonl, removes the shards and
writes the results — the same files a single process writes. A later run, whatever its dp, first folds
any shards it finds into samples.jsonl, so finished samples are never redone.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .errors import ModelTestError

# the coordination group waits for the slowest data-parallel share at the end of a run
COORDINATION_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Layout:
    world: int = 1
    rank: int = 0
    tp: int = 1
    dp: int = 1

    @property
    def group(self) -> int:
        """This rank's data-parallel group."""
        return self.rank // self.tp

    @property
    def leader(self) -> bool:
        """The group's first rank: it records the group's results."""
        return self.rank % self.tp == 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def layout(tp: int | None, dp: int | None, planned: bool = False) -> Layout:
    """The run's layout from torchrun's environment and --tp / --dp (one of them may be left out: the
    other is the world divided by it; both left out: all processes in one tensor-parallel group).
    `planned` (mm_run.sh's pre-flight, one process before torchrun): the world is tp x dp."""
    world = _env_int("WORLD_SIZE", 0) or ((tp or 1) * (dp or 1) if planned else 1)
    rank = _env_int("RANK", 0)
    for flag, value in (("--tp", tp), ("--dp", dp)):
        if value is not None and value < 1:
            raise ModelTestError(f"{flag} must be >= 1, got {value}")
    given = " x ".join(f"--{k} {v}" for k, v in (("tp", tp), ("dp", dp)) if v is not None)
    if tp is None and dp is None:
        tp, dp = world, 1
    elif tp is None:
        tp = world // dp if world % dp == 0 else 0
    elif dp is None:
        dp = world // tp if world % tp == 0 else 0
    if tp * dp != world:
        launched = f"the {world} processes torchrun started" if world > 1 else "one process (no torchrun)"
        raise ModelTestError(
            f"{given} does not fit {launched}: tp x dp must equal the number of processes (bash scripts/mm_run.sh "
            "starts one per visible device)"
        )
    return Layout(world, rank, tp, dp)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ModelTestError(f"environment variable {name}={raw!r} is not a whole number (torchrun sets it; unset it "
                             "to run one process)")  # fmt: skip
    return value


def init(lay: Layout) -> None:
    """Join the default process group (gloo: the harness only passes small objects) under torchrun."""
    if lay.world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=COORDINATION_TIMEOUT)


def share(items: list, lay: Layout) -> list:
    """This rank's group's contiguous share of `items` (balanced: sizes differ by at most one)."""
    n, groups, g = len(items), lay.dp, lay.group
    return items[g * n // groups : (g + 1) * n // groups]


def broadcast(obj, lay: Layout):
    """Rank 0's `obj`, on every rank."""
    if lay.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, lay: Layout) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if lay.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * lay.world if lay.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def shard_path(samples: Path, rank: int) -> Path:
    return samples.with_name(f"samples.rank{rank}.jsonl")


def shards(samples: Path) -> list[Path]:
    return sorted(samples.parent.glob("samples.rank*.jsonl"))


class RunLock:
    """An exclusive lock on a run's debug folder while a run writes it (fcntl: released when the
    process ends, however it ends). A second run on the same folder is refused, naming the holder."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self._take(open(self.path, "a+", encoding="utf-8"))
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self.file = f
        return self

    def probe(self) -> None:
        """Raise as `acquire` would when a run holds the lock; change nothing (a run that holds it
        created the file)."""
        if self.path.exists():
            self._take(open(self.path, encoding="utf-8")).close()

    def _take(self, f):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ModelTestError(
                f"{self.path.parent} is being written by {holder}; wait for that run to end, or choose another "
                "--output_dir"
            ) from None
        return f

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
