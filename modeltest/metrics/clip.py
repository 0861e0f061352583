"""CLIP score of captions against their images, batched, with open_clip's model, preprocessing and tokenizer.

Per image: the cosine similarity of the image and caption embeddings, exactly as the seed computes it
(MindIE-LLM `clip_score_qwenvl.py`: `F.cosine_similarity(encode_image(img).float(),
encode_text(tok([caption])).float())`, no x100, no clamp, no logit scale). CLIP-S is Hessel et al. 2021's
rescaling, 2.5 * max(cos, 0) (jmhessel/clipscore). Reference-vs-candidate comparisons use a paired
bootstrap over images with a fixed seed, so the same two files always give the same interval.

Images are decoded and preprocessed in a thread pool a few batches ahead of the model (PIL releases the
GIL while it decodes and resizes), so the accelerator is not left waiting on PIL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelTestError, closest
from .clip_towers import image_encoder, text_encoder

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "bf16")
CLIP_S_WEIGHT = 2.5  # Hessel et al. 2021, section 3
SEED_MODEL = "ViT-H-14"  # the seed's model; its weights are open_clip's laion2b_s32b_b79k
SEED_WEIGHTS = "open_clip_pytorch_model.bin"
_PREFETCH_BATCHES = 2  # batches decoded ahead of the one on an accelerator
_SHOWN_KEYS = 5
_MIN_TEXT_BUCKET = 8  # texts


def clip_s(cos: np.ndarray | Sequence[float]) -> np.ndarray:
    """CLIP-S per pair: 2.5 * max(cos, 0)."""
    return CLIP_S_WEIGHT * np.maximum(np.asarray(cos, dtype=np.float64), 0.0)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- weights


def load_weights_file(path: str | Path) -> dict:
    """A state dict from `.safetensors`, or from a torch file read with weights_only=True (memory-mapped
    when the file is in torch's zip format). Unwraps {"state_dict": ...} and a DataParallel "module."
    prefix, as open_clip's own loader does."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelTestError(
            f"{path}: weights file not found; pass --model_weights_path (the seed uses {SEED_MODEL}'s "
            f"laion2b_s32b_b79k {SEED_WEIGHTS})"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # unpickling, truncated files and safetensors header errors have many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (weights_only=True refuses pickled objects; save a plain state dict or safetensors)"
        raise ModelTestError(
            f"{path}: cannot read weights: {first}{hint if 'weights_only' in str(e) else ''}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise ModelTestError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _adapt_state_dict(model, state: dict) -> dict:
    """The key renames open_clip's load_checkpoint applies to its own older checkpoints (positions are
    never resized here: a checkpoint of another image size is a mismatch, not something to repair)."""
    from open_clip.model import convert_to_custom_text_state_dict

    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        ours = getattr(model, name, None)
        if name in state and ours is not None and state[name].ndim != ours.ndim:
            state[name] = state[name].reshape(ours.shape)
    state.pop("text.transformer.embeddings.position_ids", None)
    return state


def _mismatches(model, state: dict) -> tuple[list[str], list[str], list[str]]:
    """(shape mismatches as "key (file) vs (model)", missing keys, unexpected keys) of an adapted state."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]  # fmt: skip
    return shapes, missing, unexpected


def _meta_model(model_name: str):
    """open_clip's model on the meta device: its parameters' names and shapes without memory or random
    initialization (~0.1 s where building it for real takes seconds)."""
    import warnings

    import open_clip
    import torch

    quiet = _QuietRandomInit()
    logging.getLogger().addFilter(quiet)
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return open_clip.create_model(model_name, pretrained=None, device="meta")
    finally:
        logging.getLogger().removeFilter(quiet)


def check_fit(model, state: dict, model_name: str, path: str | Path) -> dict:
    """`state` (as read from the file) adapted to `model`, or, when it does not fit, one error: the
    open_clip architectures it does fit when there are any (see `fitting_models`), else the closest ones
    and the first missing, unexpected and shape-mismatched keys."""
    adapted = _adapt_state_dict(model, dict(state))  # a copy: `state` stays as written for the search
    shapes, missing, unexpected = _mismatches(model, adapted)
    if not (shapes or missing or unexpected):
        return adapted
    fits, closest_ones, unchecked = fitting_models(state)
    if fits:
        names = " or ".join(repr(n) for n in fits)
        total = len(set(model.state_dict()) | set(adapted))
        bad = len(shapes) + len(missing) + len(unexpected)
        how = (f"pass --model_name {fits[0]}" if len(fits) == 1 else
               "pass --model_name with the one they were trained as (their tensors have the same shapes)")  # fmt: skip
        raise ModelTestError(f"{path} does not fit open_clip model {model_name!r} ({bad} of {total} tensors "
                             f"differ) but fits {names}: {how}")  # fmt: skip
    problems = []
    for what, keys in (
        ("shape mismatch (file vs model)", shapes),
        ("missing", missing),
        ("unexpected", unexpected),
    ):
        if keys:
            more = f", ... (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:_SHOWN_KEYS])}{more}")
    not_checked = f"; not checked in time: {', '.join(unchecked)}" if unchecked else ""
    near = ", ".join(f"{n!r} ({share})" for n, share in closest_ones)
    hint = f"no open_clip architecture fits them exactly (the closest: {near}{not_checked})" if near else (
        f"no open_clip architecture fits them{not_checked}")  # fmt: skip
    raise ModelTestError(
        f"{path} does not fit open_clip model {model_name!r}: {'; '.join(problems)}; {hint}. Pass "
        f"--model_name with the architecture the weights were saved from (the seed's {SEED_WEIGHTS} is {SEED_MODEL})"
    )


def fit_state_dict(model, state: dict, model_name: str, path: str | Path) -> None:
    """Load `state` (as read from the file) into `model` strictly; see `check_fit` for the error."""
    model.load_state_dict(check_fit(model, state, model_name, path), strict=True)


# ---------------------------------------------------------------- which architecture fits


_FIT_SEARCH_S = 3.0  # candidate models built (on the meta device) to check a fit, within this much time
_CLOSEST = 3


def _block_count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pattern.match(k))})


def _plausible(cfg: dict, shapes: dict[str, tuple], dims: set[int], counts: dict[str, int]) -> list[bool] | None:
    """Necessary conditions for `cfg` to build a model these tensor shapes fit, read from the config alone
    (building a model costs up to a second even on the meta device; open_clip has ~150). None: the
    architecture cannot be checked here (a Hugging Face text tower would need the Hub)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    text, vision = cfg.get("text_cfg") or {}, cfg.get("vision_cfg") or {}
    if text.get("hf_model_name"):
        return None
    try:
        t, v = CLIPTextCfg(**text), CLIPVisionCfg(**vision)
    except TypeError:  # a config with fields this open_clip's dataclasses lack: only the exact check can say
        return []
    kind = "timm" if v.timm_model_name else ("vit" if isinstance(v.layers, int) else "resnet")
    checks = [cfg.get("embed_dim") in dims, kind == counts["vision_kind"]]
    if kind == "vit":
        conv = shapes.get("visual.conv1.weight")
        if conv is not None and len(conv) == 4:
            checks.append((conv[0], conv[-1]) == (v.width, v.patch_size))
        checks.append(counts["vision_blocks"] == v.layers)
    token = shapes.get("token_embedding.weight") or shapes.get("text.token_embedding.weight")
    if token is not None:
        checks.append(tuple(token) == (t.vocab_size, t.width))
    position = shapes.get("positional_embedding") or shapes.get("text.positional_embedding")
    if position is not None and len(position) == 2:
        checks.append(position[0] - t.context_length in (0, 1))  # CoCa adds a class token: context + 1
    if counts["text_blocks"]:
        checks.append(counts["text_blocks"] == t.layers)
    return checks


def fitting_models(state: dict, budget_s: float = _FIT_SEARCH_S):
    """The open_clip architectures whose state dict `state` loads into exactly: (their names; when none,
    the closest as (name, "k/n tensors fit"); the candidates left unchecked when the time ran out).

    Configs are first screened by the sizes they imply (embedding width, text width, vocabulary and
    context, patch size, block counts, tower kinds); the few that pass (when none does, the few that
    fail the fewest conditions) are built on the meta device and compared key by key, with open_clip's
    own renames applied."""
    import open_clip

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    keys = list(shapes)
    counts = {
        "vision_kind": "timm" if any(k.startswith("visual.trunk.") for k in keys)
        else "resnet" if any(k.startswith("visual.layer1.") for k in keys) else "vit",
        "vision_blocks": _block_count(keys, "visual.transformer.resblocks."),
        "text_blocks": _block_count(keys, "transformer.resblocks.") or _block_count(keys, "text.transformer.resblocks."),
    }  # fmt: skip
    dims = {d for shape in shapes.values() for d in shape}
    screened = []
    for name in open_clip.list_models():
        checks = _plausible(open_clip.get_model_config(name) or {}, shapes, dims, counts)
        if checks is not None:
            screened.append((sum(checks) / max(len(checks), 1), all(checks), name))
    candidates = [name for _, ok, name in screened if ok]
    if not candidates:
        candidates = [name for *_, name in sorted(screened, key=lambda x: (-x[0], x[2]))[:_CLOSEST]]
    fits, near, unchecked = [], [], []
    started = time.perf_counter()
    for i, name in enumerate(candidates):
        if time.perf_counter() - started >= budget_s:
            unchecked = candidates[i:]
            break
        try:
            model = _meta_model(name)
        except Exception:  # a config this open_clip cannot build offline is no candidate
            continue
        adapted = _adapt_state_dict(model, dict(state))
        expected = model.state_dict()
        matched = sum(1 for k, v in expected.items() if k in adapted and tuple(adapted[k].shape) == tuple(v.shape))
        total = len(set(expected) | set(adapted))
        if matched == total:
            fits.append(name)
        else:
            near.append((matched / total, name, f"{matched}/{total} tensors fit"))
    near.sort(key=lambda x: (-x[0], x[1]))
    return fits, [] if fits else [(name, share) for _, name, share in near[:_CLOSEST]], unchecked


def check_model_name(model_name: str) -> None:
    import open_clip

    known = open_clip.list_models()
    if model_name not in known:
        hint = closest(model_name, known)
        raise ModelTestError(
            f"unknown open_clip model {model_name!r}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + "; the names are open_clip.list_models(), e.g. ViT-H-14, ViT-B-32"
        )


class _QuietRandomInit(logging.Filter):
    """open_clip warns that the model is randomly initialized; here the weights are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


# ---------------------------------------------------------------- scoring


@dataclass
class ScoreResult:
    """cos[k, i]: text set k against image i (NaN where that text is None or the image is unreadable)."""

    cos: np.ndarray
    unreadable: dict[int, str] = field(default_factory=dict)  # image index -> why


class ClipScorer:
    """An open_clip model with its eval preprocessing and tokenizer; scores (image, caption) pairs in batches.

    weights: a `.bin`/`.pt` state dict or `.safetensors` file; None keeps open_clip's random init
    (benchmarks, tests).
    """

    def __init__(self, model_name: str = SEED_MODEL, weights: str | Path | None = None, device: str = "cpu",
                 precision: str = "fp32", num_workers: int | None = None):  # fmt: skip
        import open_clip
        import torch

        if precision not in PRECISIONS:
            raise ModelTestError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if num_workers is not None and num_workers < 1:
            raise ModelTestError(f"num_workers must be >= 1, got {num_workers}")
        check_model_name(model_name)
        state = (
            load_weights_file(weights) if weights is not None else None
        )  # a bad file fails before the model
        if state is not None:  # on the meta device first: weights that do not fit fail in seconds, not minutes
            check_fit(_meta_model(model_name), state, model_name, weights)
        quiet = _QuietRandomInit()
        logging.getLogger().addFilter(quiet)
        try:
            # open_clip's own order: create, move and cast (LayerNorms stay fp32), then load the weights.
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None, precision=precision, device=device
            )
        finally:
            logging.getLogger().removeFilter(quiet)
        if state is not None:
            fit_state_dict(model, state, model_name, weights)
            del state
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)  # 77 tokens for CLIP models, truncating
        self.model_name = model_name
        self.device = torch.device(device)
        if self.device.type == "cpu":
            from ..host_memory import keep_freed_host_memory

            keep_freed_host_memory()  # the activations of each batch reuse the last one's pages
        self.precision = precision
        self.input_dtype = open_clip.get_input_dtype(precision) or torch.float32
        self.num_workers = num_workers or min(16, os.cpu_count() or 1)
        # open_clip's standard towers run through the exact, leaner forwards of clip_towers (the pooled
        # row alone in the last block, fused attention); other towers through open_clip itself
        self._image_encoder = image_encoder(model)
        self._text_encoder = text_encoder(model)
        # accelerators: one text launch per batch (small pieces cost launches), its length a multiple of 8
        # (a few shapes recur); CPU, where the cost is proportional to the tokens: less padding
        self.text_buckets = 4 if self.device.type == "cpu" else 1
        self.text_multiple = 1 if self.device.type == "cpu" else 8

    @property
    def trim_text(self) -> bool:
        """Whether texts may be cut after their batch's longest one (a causal text tower pooled at EOT)."""
        return self._text_encoder is not None

    @property
    def lean_towers(self) -> tuple[bool, bool]:
        """Whether the image and the text tower use clip_towers' forwards (else open_clip's own)."""
        return self._image_encoder is not None, self._text_encoder is not None and self._text_encoder.lean

    def encode_image(self, pixels):
        """open_clip's CLIP.encode_image (equal up to float rounding)."""
        return (self._image_encoder or self.model.encode_image)(pixels)

    def encode_text(self, tokens):
        """open_clip's CLIP.encode_text (equal up to float rounding). With a causal text tower pooled at the
        EOT token (the CLIP models, ViT-H-14 included) the tokens may be cut after the batch's longest text:
        with the causal mask the later (padding) positions cannot change the EOT's output."""
        return (self._text_encoder or self.model.encode_text)(tokens)

    def load_image(self, path: str | Path):
        """[3, H, W] float: open_clip's eval transform on the file as PIL opens it (the seed's input), 16-bit
        and float images scaled to 8 bits first (open_clip's own convert("RGB") would clip them blank)."""
        from PIL import Image

        from engine import to_rgb

        with Image.open(path) as im:
            return self.preprocess(to_rgb(im, str(path)))

    def _load_or_error(self, path):
        try:
            return self.load_image(path)
        except Exception as e:  # PIL raises several types for truncated or unknown files
            return f"{type(e).__name__}: {e}"

    def score(
        self,
        images: Sequence[str | Path],
        texts: Sequence[Sequence[str | None]],
        batch_size: int = 64,
        progress: bool = False,
    ) -> ScoreResult:
        """Cosine similarity of each image with each of its texts. texts[k][i] is text set k's caption for
        image i (None: not scored). Each image is encoded once however many text sets there are."""
        import torch
        from tqdm import tqdm

        n, sets = len(images), len(texts)
        if any(len(t) != n for t in texts):
            raise ValueError("every text set needs one entry per image")
        if batch_size < 1:
            raise ModelTestError(f"batch_size must be >= 1, got {batch_size}")
        cos = np.full((sets, n), np.nan)
        unreadable: dict[int, str] = {}
        starts = list(range(0, n, batch_size))

        def submit(start: int) -> tuple[range, list[Future], Future]:
            rows = range(start, min(start + batch_size, n))
            pairs = [(k, i) for i in rows for k in range(sets) if texts[k][i] is not None]
            decoded = [pool.submit(self._load_or_error, images[i]) for i in rows]
            return rows, decoded, pool.submit(self._tokenize, pairs, texts)

        bar = tqdm(total=n, unit="img", desc="clip score", disable=not progress, dynamic_ncols=True)
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="clip-decode")
        in_flight = None  # the previous batch's result stays on the device until the next batch is queued
        try:
            # An accelerator computes while the pool decodes the next batches. On the CPU the model already
            # uses every core: decoding alongside it only oversubscribes them, so batches take turns.
            ahead = 0 if self.device.type == "cpu" else _PREFETCH_BATCHES
            queue = deque(submit(s) for s in starts[: max(ahead, 1)])
            following = iter(starts[max(ahead, 1) :])
            while queue:
                rows, decoded, tokenized = queue.popleft()
                if ahead and (start := next(following, None)) is not None:
                    queue.append(submit(start))
                pixels = {}
                for i, fut in zip(rows, decoded, strict=True):
                    out = fut.result()
                    if isinstance(out, str):
                        unreadable[i] = out
                    else:
                        pixels[i] = out
                with torch.inference_mode():
                    result = self._forward(pixels, *tokenized.result())
                if not ahead and (start := next(following, None)) is not None:
                    queue.append(submit(start))
                if in_flight is not None:
                    self._collect(cos, *in_flight)
                in_flight = result
                bar.update(len(rows))
            if in_flight is not None:
                self._collect(cos, *in_flight)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # an error or Ctrl-C drops the batches queued ahead
            bar.close()
        return ScoreResult(cos, unreadable)

    def _forward(self, pixels: dict, pairs: list[tuple[int, int]], text_of: list[int], buckets: list):
        """Queue one batch on the device: (cos of each pair whose image decoded, those pairs), or None.
        Nothing here waits for the device, so the next batch is prepared while this one runs."""
        import torch
        import torch.nn.functional as F

        slot = {i: j for j, i in enumerate(pixels)}  # image index -> row in the batch
        keep = [j for j, (_, i) in enumerate(pairs) if i in slot]
        if not keep:
            return None
        pin = self.device.type == "cuda"
        first = next(iter(pixels.values()))
        # [b, 3, H, W], stacked straight into pinned memory so the copy is asynchronous (and the cast to
        # the model's dtype happens on the device)
        x = torch.stack(list(pixels.values()), out=torch.empty((len(pixels), *first.shape), pin_memory=pin))
        x = x.to(self.device, self.input_dtype, non_blocking=pin)
        # [2, p]: each pair's image row and text row. Pinned too: a copy from pageable memory would wait
        # for the batch still running on the device.
        index = torch.tensor([[slot[pairs[j][1]] for j in keep], [text_of[j] for j in keep]])
        index, *buckets = (
            (t.pin_memory() if pin else t).to(self.device, non_blocking=pin) for t in (index, *buckets)
        )
        img = self.encode_image(x).float()  # [b, d]
        txt = self.encode_texts(buckets).float()  # [u, d]: the batch's distinct texts
        return F.cosine_similarity(img[index[0]], txt[index[1]], dim=-1), [pairs[j] for j in keep]

    def _tokenize(self, pairs: list[tuple[int, int]], texts):
        """Tokens of the distinct texts among `pairs` (a caption shared by both text sets is encoded once,
        so identical captions score identically) and each pair's row in their features."""
        distinct: dict[str, int] = {}
        text_of = [distinct.setdefault(texts[k][i], len(distinct)) for k, i in pairs]
        row, buckets = self.tokenize(list(distinct))
        return pairs, [row[t] for t in text_of], buckets

    def tokenize(self, texts: list[str]) -> tuple[list[int], list]:
        """open_clip's tokenizer (truncating at its context length), ready for `encode_texts`: (each text's
        row in the features, token buckets). When the text tower allows cutting (see `encode_text`) the
        texts are sorted by length and each bucket is cut after its longest text's EOT (on accelerators
        rounded up to a multiple of 8); on the CPU, where the cost is proportional to the tokens, a batch is
        split into up to 4 such buckets."""
        import torch

        tokens = self.tokenizer(texts)  # [u, context]
        if not self.trim_text or not len(tokens):
            return list(range(len(texts))), [tokens]
        lengths = tokens.argmax(dim=-1) + 1  # EOT is the highest id
        order = torch.argsort(lengths, stable=True)
        row = torch.empty_like(order)
        row[order] = torch.arange(len(order))
        tokens, lengths = tokens[order], lengths[order]
        parts = max(1, min(self.text_buckets, len(tokens) // _MIN_TEXT_BUCKET))
        edges = [round(len(tokens) * p / parts) for p in range(parts + 1)]
        step = self.text_multiple
        cut = [min(tokens.shape[1], -(-int(lengths[b - 1]) // step) * step) for b in edges[1:]]
        buckets = [tokens[a:b, :n] for a, b, n in zip(edges, edges[1:], cut, strict=False)]
        return row.tolist(), buckets

    def encode_texts(self, buckets: list) -> torch.Tensor:
        """[u, d] text features, in the row order `tokenize` gave (buckets already on the model's device)."""
        import torch

        return torch.cat([self.encode_text(b) for b in buckets])

    @staticmethod
    def _collect(cos: np.ndarray, values, where: list[tuple[int, int]]) -> None:
        values = values.cpu().numpy()
        for v, (k, i) in zip(values, where, strict=True):
            cos[k, i] = v


# ---------------------------------------------------------------- reference vs candidate


@dataclass(frozen=True)
class Comparison:
    num_shared: int
    candidate_clip_score: float
    reference_clip_score: float
    candidate_clip_s: float
    reference_clip_s: float
    mean_diff: float  # mean(candidate - reference)
    ci95: tuple[float, float]
    share_worse: float  # share of images with candidate < reference - tolerance
    tolerance: float
    verdict: str  # PASS when the mean drop is at most the tolerance

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"


def compare(candidate: np.ndarray, reference: np.ndarray, tolerance: float) -> Comparison:
    """Paired over images with modeltest compare's statistics (modeltest/stats.py: mean difference,
    seeded percentile bootstrap interval, the "abs" gate's verdict)."""
    from ..stats import paired, verdict

    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    stats = paired(reference, candidate)
    return Comparison(
        num_shared=int(candidate.size),
        candidate_clip_score=float(candidate.mean()),
        reference_clip_score=float(reference.mean()),
        candidate_clip_s=float(clip_s(candidate).mean()),
        reference_clip_s=float(clip_s(reference).mean()),
        mean_diff=stats.diff,
        ci95=stats.ci95,
        share_worse=float(np.mean(candidate - reference < -tolerance)),
        tolerance=float(tolerance),
        verdict=verdict(stats, max_drop=tolerance),
    )
