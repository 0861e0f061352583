"""`python -m modeltest.clip_score`: CLIP score of generated captions against their images (the seed's
clip_score_qwenvl.py, batched), and with --reference a paired comparison of two caption files (e.g. an
NPU run against a GPU run) with a PASS/FAIL verdict a nightly job can gate on.

Captions: `{image_file: caption}` (the seed's gpu_coco_rst.json / npu_coco_rst.json), or the older
`{"image_file": [...], "model_answer": [...]}`. Grounding markup is stripped for scoring only.

Outputs (default: beside the captions file): <stem>_clip_score.csv (one row per scored image: image,
caption as written, scored_text, cos, clip_s [, the reference's columns and diff]) and
<stem>_clip_score.json (summary and configuration). Exit codes: 0 ok, 1 verdict FAIL, 2 bad input
(missing images too, with --strict).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EXIT_BAD_INPUT, ModelTestError
from .metrics.grounding import strip_grounding
from .output import atomic_write, write_json

PROG = "clip_score"
EXIT_FAIL = 1  # the reference comparison's verdict is FAIL
_SHOWN_NAMES = 10
OLD_FORMAT = ("image_file", "model_answer")  # the seed's older caption file


@dataclass(frozen=True)
class Entry:
    image: str  # as written in the captions file, relative to --dataset_path
    caption: str  # as written (grounding markup kept)

    @property
    def scored_text(self) -> str:
        return strip_grounding(self.caption)


SCRIPT = "modeltest-clip-score"  # the console script pyproject.toml's [project.scripts] installs
EPILOG = """\
exit codes:
  0    scored (with --reference: verdict PASS)
  1    --reference verdict FAIL: the mean drop is more than --tolerance
  2    bad input or usage (an error line on stderr); with --strict also missing or unreadable images
  130  interrupted"""


def _prog() -> str:
    """The name the user typed: the console script, or `python -m` (where argv[0] is this file's path,
    which argparse would show as clip_score.py)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if name.startswith(SCRIPT):  # modeltest-clip-score, or .exe / -script.py on Windows
        return SCRIPT
    return f"python -m modeltest.{PROG}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="CLIP score of captions against their images (open_clip), optionally compared "
        "with a reference caption file (paired bootstrap, PASS/FAIL verdict).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the epilog's lines
    )
    p.add_argument(
        "--image_info",
        required=True,
        help='captions JSON: {"image.jpg": "caption", ...} or {"image_file": [...], "model_answer": [...]}',
    )
    p.add_argument(
        "--dataset_path", required=True, help="folder holding the images named in the captions file"
    )
    p.add_argument(
        "--model_weights_path",
        default="./open_clip_pytorch_model.bin",
        help="open_clip weights, .bin (read with weights_only=True) or .safetensors "
        "(default: ./open_clip_pytorch_model.bin, the seed's ViT-H-14 laion2b_s32b_b79k)",
    )
    p.add_argument("--model_name", default="ViT-H-14", help="open_clip architecture (default ViT-H-14)")
    p.add_argument(
        "--device",
        help="cpu, cuda[:i] or npu[:i] (default: npu, else cuda, else cpu; a bare "
        "index such as the seed's '0' means that device of the best kind)",
    )
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="model precision (default fp32, the seed's)",
    )
    p.add_argument("--num_workers", type=int, help="image decoding threads (default: CPU count, at most 16)")
    p.add_argument("--reference", help="reference captions JSON (same formats) to compare against")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="largest acceptable mean drop in cosine similarity vs --reference (default 0.01)",
    )
    p.add_argument("--output_dir", help="where the CSV and JSON go (default: beside the captions file)")
    p.add_argument("--strict", action="store_true", help="missing or unreadable images are an error (exit 2)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p  # fmt: skip


# ---------------------------------------------------------------- input


def read_captions(path: str | Path) -> list[Entry]:
    """Entries in file order from either caption format; every problem names the file and the key."""
    from .tasks.base import read_json

    path = Path(path)
    if not path.is_file():
        raise ModelTestError(f"{path}: captions file not found")
    return captions_from_json(read_json(path, "captions file"), path)


def captions_from_json(data, path: str | Path) -> list[Entry]:
    """Entries from a parsed caption file (either format); every problem names the file and the key."""
    from .tasks.base import json_type, show_json

    if not isinstance(data, dict):
        raise ModelTestError(f"{path}: expected a JSON object {{image: caption}}, got {json_type(data)}")
    if set(data) == set(OLD_FORMAT) and all(isinstance(data[k], list) for k in OLD_FORMAT):
        images, captions = data["image_file"], data["model_answer"]
        if len(images) != len(captions):
            raise ModelTestError(
                f"{path}: 'image_file' has {len(images)} entries but 'model_answer' has {len(captions)}"
            )
        pairs = list(zip(images, captions, strict=True))
        seen: dict[str, int] = {}
        for n, (image, caption) in enumerate(pairs):
            where = f"{path}: entry {n} of 'image_file'/'model_answer'"
            if not isinstance(image, str) or not image:
                raise ModelTestError(f"{where}: the image must be a non-empty file name, got {show_json(image)}")
            if not isinstance(caption, str):
                raise ModelTestError(f"{where} ({image}): the caption must be text, got {show_json(caption)}")
            if image in seen:
                raise ModelTestError(
                    f"{where}: image {image!r} is already entry {seen[image]}; list each image once"
                )
            seen[image] = n
    else:
        pairs = list(data.items())
        for image, caption in pairs:
            if not image:
                raise ModelTestError(f"{path}: an empty image name (\"\") has a caption; name its image file")
            if not isinstance(caption, str):
                raise ModelTestError(f"{path}: caption for {image!r} must be text, got {show_json(caption)}")
    if not pairs:
        raise ModelTestError(f"{path}: no captions")
    return [Entry(image, caption) for image, caption in pairs]


def _names(names: list[str]) -> str:
    more = f", ... (+{len(names) - _SHOWN_NAMES} more)" if len(names) > _SHOWN_NAMES else ""
    return ", ".join(names[:_SHOWN_NAMES]) + more


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _resolve_device(device: str | None) -> str:
    from engine import DeviceError, resolve_device

    try:
        if device is not None and device.isdigit():  # the seed's --device 0
            kind = resolve_device(None).split(":")[0]
            if kind == "cpu":
                raise ModelTestError(
                    f"--device {device}: a device index needs an npu or cuda device; none is visible"
                )
            return resolve_device(f"{kind}:{device}")
        return resolve_device(device)
    except DeviceError as e:
        raise ModelTestError(f"--device: {e}") from None


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("modeltest", "torch", "open_clip_torch", "torch_npu"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------- output


def _csv_text(rows: list[tuple[Entry, float, float]], ref: dict[str, Entry] | None) -> str:
    """One row per scored image: (entry, cos, reference cos or NaN)."""
    from .metrics.clip import clip_s

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["image", "caption", "scored_text", "cos", "clip_s"]
    if ref is not None:
        header += ["ref_caption", "ref_scored_text", "ref_cos", "ref_clip_s", "diff"]
    w.writerow(header)
    for e, c, rc in rows:
        row = [e.image, e.caption, e.scored_text, repr(float(c)), repr(float(clip_s(c)))]
        if ref is not None:
            r = ref.get(e.image)
            row += [r.caption, r.scored_text] if r else ["", ""]
            row += (
                ["", "", ""]
                if math.isnan(rc)
                else [repr(float(rc)), repr(float(clip_s(rc))), repr(float(c - rc))]
            )
        w.writerow(row)
    return buf.getvalue()


def _print_tables(summary: dict) -> None:
    from tabulate import tabulate

    cols = ["captions", "images", "missing", "unreadable", "clip_score (cos)", "CLIP-S"]
    row = [Path(summary["image_info"]).name, summary["num_images"], summary["num_missing"],
           summary["num_unreadable"], f"{summary['clip_score']:.4f}", f"{summary['clip_s']:.4f}"]  # fmt: skip
    print(tabulate([row], headers=cols, tablefmt="github"))
    cmp = summary.get("comparison")
    if cmp:
        from termcolor import colored

        verdict = colored(cmp["verdict"], "green" if cmp["verdict"] == "PASS" else "red")
        lo, hi = cmp["ci95"]
        print()
        row = [
            cmp["num_shared"],
            f"{cmp['candidate_clip_score']:.4f}",
            f"{cmp['reference_clip_score']:.4f}",
            f"{cmp['mean_diff']:+.4f}",
            f"[{lo:+.4f}, {hi:+.4f}]",
            f"{100 * cmp['share_worse']:.1f}%",
            cmp["tolerance"],
            verdict,
        ]
        cols = [
            "shared",
            "candidate",
            "reference",
            "mean diff",
            "95% CI",
            "worse > tol",
            "tolerance",
            "verdict",
        ]
        print(tabulate([row], headers=cols, tablefmt="github"))
    print(f"per image: {summary['outputs']['csv']}\nsummary:   {summary['outputs']['json']}")


def check_output_dir(out_dir: Path, outputs: tuple[Path, ...], named: str) -> None:
    """Before any scoring: a file can be written where the outputs go, so a folder that is a file, a
    read-only folder or a full disk shows now rather than after every image is scored. A probe file is
    created, filled, synced and removed in the folder, or where a missing folder would be made (a
    refused run leaves no folder behind); the output names must not be folders."""
    from .output import probe_writable

    try:
        probe_writable(out_dir, create=False)
    except OSError as e:
        where = e.filename or out_dir
        raise ModelTestError(f"{named} {out_dir}: cannot write the outputs there ({where}: {e.strerror or e}); "
                             "choose another --output_dir (or free space)") from None  # fmt: skip
    for path in outputs:
        if path.exists() and not path.is_file():
            raise ModelTestError(f"{path} is a folder, so the output cannot be written; move it or choose "
                                 "another --output_dir")  # fmt: skip


# ---------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ModelTestError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.num_workers is not None and args.num_workers < 1:
        raise ModelTestError(f"--num_workers must be >= 1, got {args.num_workers}")
    if not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
        raise ModelTestError(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    captions_path = Path(args.image_info)
    entries = read_captions(captions_path)
    reference = read_captions(args.reference) if args.reference else None
    dataset = Path(args.dataset_path)
    if not dataset.is_dir():
        raise ModelTestError(f"--dataset_path {dataset}: not a folder")
    weights = Path(args.model_weights_path)
    if not weights.is_file():
        raise ModelTestError(
            f"--model_weights_path {weights}: file not found (the seed uses ViT-H-14's laion2b_s32b_b79k "
            "open_clip_pytorch_model.bin)"
        )
    out_dir = Path(args.output_dir) if args.output_dir else captions_path.parent
    stem = captions_path.stem
    csv_path, json_path = out_dir / f"{stem}_clip_score.csv", out_dir / f"{stem}_clip_score.json"
    check_output_dir(out_dir, (csv_path, json_path), "--output_dir" if args.output_dir else "the captions' folder")

    # Which images can be scored is known before the model loads.
    missing = [e.image for e in entries if not (dataset / e.image).is_file()]
    ref_by_image = {e.image: e for e in reference} if reference is not None else None
    if ref_by_image is not None:
        ours = {e.image for e in entries}
        only_candidate = sum(1 for e in entries if e.image not in ref_by_image)
        only_reference = sum(1 for image in ref_by_image if image not in ours)
        if only_candidate == len(entries):
            raise ModelTestError(f"{args.reference} and {captions_path} share no images; nothing to compare")
        if only_candidate or only_reference:
            shared = len(entries) - only_candidate
            _warn(
                f"{only_candidate} images only in {captions_path.name}, {only_reference} only in "
                f"{Path(args.reference).name}; the comparison uses the {shared} shared"
            )
    if missing:
        msg = f"{len(missing)} of {len(entries)} images listed in {captions_path} are not in {dataset}: "
        msg += _names(missing)
        if args.strict:
            raise ModelTestError(msg)
        _warn(msg + " (skipped)")
    empty = [e.image for e in entries if not e.scored_text]
    if empty:
        _warn(f"{len(empty)} empty captions (scored as empty text): {_names(empty)}")
    missing_set = set(missing)
    present = [e for e in entries if e.image not in missing_set]
    if not present:
        raise ModelTestError(f"none of the {len(entries)} images listed in {captions_path} is in {dataset}")

    device = _resolve_device(args.device)
    from .metrics.clip import ClipScorer, clip_s, compare, sha256_file
    from .stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

    config = {"model_name": args.model_name, "model_weights_path": str(weights), "device": device,
              "precision": args.precision, "batch_size": args.batch_size, "image_info": str(captions_path),
              "dataset_path": str(dataset), "reference": args.reference, "tolerance": args.tolerance,
              "strict": args.strict}  # fmt: skip
    with ThreadPoolExecutor(1) as hasher:  # hashing a multi-GB file overlaps building the model
        digest = hasher.submit(sha256_file, weights)
        scorer = ClipScorer(args.model_name, weights, device, args.precision, args.num_workers)
        weights_sha256 = digest.result()
    config["num_workers"] = scorer.num_workers

    texts = [[e.scored_text for e in present]]
    if ref_by_image is not None:
        texts.append(
            [ref_by_image[e.image].scored_text if e.image in ref_by_image else None for e in present]
        )
    t0 = time.perf_counter()
    result = scorer.score(
        [dataset / e.image for e in present], texts, args.batch_size, progress=not args.no_progress
    )
    elapsed = time.perf_counter() - t0
    cos = result.cos[0]
    unreadable = {present[i].image: why for i, why in sorted(result.unreadable.items())}
    if unreadable:
        _warn(f"{len(unreadable)} images could not be read (skipped): "
              + _names([f"{k} ({v})" for k, v in unreadable.items()]))  # fmt: skip
    scored = cos[~np.isnan(cos)]
    if not scored.size:
        raise ModelTestError(f"none of the {len(present)} images found in {dataset} could be read")
    summary = {
        "model_name": args.model_name,
        "weights_file": str(weights),
        "weights_sha256": weights_sha256,
        "image_info": str(captions_path),
        "num_listed": len(entries),
        "num_images": int(scored.size),
        "num_missing": len(missing),
        "num_unreadable": len(unreadable),
        "num_empty_captions": len(empty),
        "clip_score": float(scored.mean()),
        "clip_s": float(clip_s(scored).mean()),
        "missing": missing,
        "unreadable": unreadable,
        "empty_captions": empty,
        "config": config,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(len(present) / elapsed, 2) if elapsed > 0 else None,
        "versions": _versions(),
        "outputs": {"csv": str(csv_path), "json": str(json_path)},
    }
    ref_cos = result.cos[1] if ref_by_image is not None else np.full(len(present), np.nan)
    comparison = None
    if ref_by_image is not None:
        paired = ~np.isnan(cos) & ~np.isnan(ref_cos)
        if not paired.any():
            raise ModelTestError(f"no image shared by {captions_path} and {args.reference} could be scored")
        comparison = compare(cos[paired], ref_cos[paired], args.tolerance)
        summary["comparison"] = {
            "reference": str(args.reference),
            "num_shared": comparison.num_shared,
            "only_in_candidate": only_candidate,
            "only_in_reference": only_reference,
            "candidate_clip_score": comparison.candidate_clip_score,
            "reference_clip_score": comparison.reference_clip_score,
            "candidate_clip_s": comparison.candidate_clip_s,
            "reference_clip_s": comparison.reference_clip_s,
            "mean_diff": comparison.mean_diff,
            "ci95": list(comparison.ci95),
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "unit": "image"},
            "share_worse": comparison.share_worse,
            "tolerance": comparison.tolerance,
            "verdict": comparison.verdict,
        }
    scored_rows = [(e, c, rc) for e, c, rc in zip(present, cos, ref_cos, strict=True) if not np.isnan(c)]
    for path, write in ((csv_path, lambda p: atomic_write(p, _csv_text(scored_rows, ref_by_image))),
                        (json_path, lambda p: write_json(p, summary))):  # fmt: skip
        try:
            write(path)
        except OSError as e:  # the disk filled up (ENOSPC) or the folder changed while scoring
            got = f"clip_score {summary['clip_score']:.4f}, CLIP-S {summary['clip_s']:.4f}, {scored.size} images"
            if comparison is not None:
                got += f", verdict {comparison.verdict} (mean diff {comparison.mean_diff:+.4f})"
            raise ModelTestError(f"cannot write {path}: {e.strerror or e}; the scores were computed ({got}) "
                                 "but not saved: free space or choose another --output_dir, and rerun") from None
    _print_tables(summary)
    if unreadable and args.strict:
        raise ModelTestError(f"{len(unreadable)} images could not be read (--strict); see {json_path}")
    if comparison is not None and not comparison.passed:
        print(
            f"{PROG}: FAIL: mean drop {-comparison.mean_diff:.4f} > tolerance {comparison.tolerance}",
            file=sys.stderr,
        )
        return EXIT_FAIL
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(build_parser().parse_args(argv))
    except ModelTestError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
