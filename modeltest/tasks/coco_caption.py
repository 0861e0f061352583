"""COCO captioning: one grounded caption per image, written as the seed's `<device>_coco_rst.json`.

Dataset format: a folder of images (local_dataset_path / --dataset_path; the seed samples 100 from
COCO val2014), all of its image files, or only those named in `image_list` (--image_list: one file
name or path per line, relative to the folder; blank lines and `#` comments skipped). Optional
references (`annotations_path` / --annotations_path) in COCO's captions_val2014.json form:
{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}, matched by file name.
`--limit N` draws N images at random with `--seed` (default 0) from the name-sorted list, so the
same command picks the same images.

Prompt: `Generate the caption in English with grounding:` after the image, rendered by Qwen-VL's
`from_list_format` (`Picture 1: <img>{path}</img>\\n{prompt}`) on the engine, as image + text through
the chat template on hf; greedy, max_output_length new tokens from the model config (else the task's
requested_max_output_length). The model config's prompt_prefix/prompt_suffix (VQA cues) do not apply.

Outputs: beside the results CSV, `<npu|gpu|cpu>_coco_rst.json` = {image file name: caption} sorted
by key, grounding markup (`<ref>..</ref><box>(x1,y1),(x2,y2)</box>`) kept, failed images left out.
Score-only mode names it after the device its input names (`--predictions gpu_coco_rst.json` writes
`gpu_coco_rst.json`), else `predictions_coco_rst.json`: never the CPU, which made no caption.
An existing file is replaced only when every caption in it is among this run's samples (a resumed
or extended run); anything else needs --overwrite.

Scores: captions are scored as plain text (`strip_grounding`: refs keep their words, boxes go).
Without references the per-sample score is `non_empty` (1 when the caption has text), so the CSV row
counts non-empty captions. With references, rows for BLEU-4, METEOR, ROUGE-L and CIDEr over all the
run's images follow (Pass left empty: these are not counts); a failed image counts as an empty caption.

References: Qwen-VL eval_mm/evaluate_caption.py (COCO caption evaluation), the seed's
run_coco_rst_gpu.py (prompt, JSON format), pycocoevalcap (the metrics).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..errors import ModelTestError
from ..metrics.caption import CORPUS_METRICS, coco_caption_scores, require_caption_scorers
from ..metrics.grounding import strip_grounding
from ..output import RunPaths, atomic_write
from .base import Sample, Task, check_id, json_type, read_json, read_text, show_json

DEFAULT_PROMPT = "Generate the caption in English with grounding:"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class CocoCaption(Task):
    name = "coco_caption"
    default_max_new_tokens = 256  # the seed's run_pa --max_output_length
    default_metric = "non_empty"
    metric_types = ("non_empty",)
    reads = ("image_list", "annotations_path")
    list_format = True
    references: dict[str, list[str]] = {}

    def load(self, dataset_path: str | None = None, limit: int | None = None) -> list[Sample]:
        folder = Path(self.dataset_path(dataset_path))
        if not folder.is_dir():
            raise ModelTestError(f"{folder}: coco_caption reads a folder of images; set local_dataset_path "
                                 "or --dataset_path to it (and --image_list to choose images)")  # fmt: skip
        listed = self.config.image_list
        images = self._read_list(Path(listed), folder) if listed else self._scan(folder)
        references = None
        if self.config.annotations_path:
            ann = self.config.annotations_path
            references = self._read_annotations(Path(ann), images)
            require_caption_scorers(ann)  # before the model loads, not after the captions are made
        prompt = self.config.prompt or DEFAULT_PROMPT
        samples = [
            Sample(name, [{"image": path}, {"text": prompt}], references[name] if references else [], self.subject, path)
            for name, path in sorted(images.items())
        ]
        self.references = {s.id: s.references for s in samples}
        return self.select(samples, limit) if limit else samples

    def select(self, samples: list[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
        if not limit or limit >= len(samples):
            return samples
        ordered = sorted(samples, key=lambda s: s.id)  # the draw must not depend on the listing order
        return sorted(random.Random(seed).sample(ordered, limit), key=lambda s: s.id)

    @staticmethod
    def _scan(folder: Path) -> dict[str, str]:
        images = {e.name: str(folder / e.name) for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS}  # fmt: skip
        if not images:
            raise ModelTestError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder")
        return images

    @staticmethod
    def _read_list(path: Path, folder: Path) -> dict[str, str]:
        if not path.is_file():
            raise ModelTestError(f"image list not found: {path} (--image_list / image_list)")
        images: dict[str, str] = {}
        where: dict[str, int] = {}
        for lineno, line in enumerate(read_text(path, "image list").split("\n"), 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            image = entry if os.path.isabs(entry) else str(folder / entry)
            if not os.path.isfile(image):
                raise ModelTestError(f"{path}:{lineno}: image not found: {image} (names are relative to {folder})")
            name = os.path.basename(image)
            if name in images:
                raise ModelTestError(f"{path}:{lineno}: {name} is already listed on line {where[name]}; "
                                     "captions are keyed by file name, so each name may appear once")  # fmt: skip
            images[name], where[name] = image, lineno
        if not images:
            raise ModelTestError(f"{path}: the image list names no images")
        return images

    @staticmethod
    def _read_annotations(path: Path, images: dict[str, str]) -> dict[str, list[str]]:
        data = read_json(path, "annotations file")
        shape = '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}'
        if not isinstance(data, dict):
            raise ModelTestError(f"{path}: expected COCO caption annotations {shape}, got {json_type(data)}")
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                got = "it has none" if key not in data else f"it is {json_type(data[key])}"
                raise ModelTestError(f"{path}: expected COCO caption annotations {shape}: {key!r} must be a list, {got}")
        ids: dict[int | str, str] = {}
        for i, entry in enumerate(data["images"]):
            where = f"{path}: images[{i}]"
            if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
                raise ModelTestError(f"{where} needs an 'id' and a 'file_name', got {show_json(entry)}")
            image_id = check_id(entry["id"], where, "id")
            if not isinstance(entry["file_name"], str) or not entry["file_name"]:
                raise ModelTestError(f"{where}: 'file_name' must be non-empty text, got {show_json(entry['file_name'])}")
            if image_id in ids:
                raise ModelTestError(f"{where}: id {image_id!r} is already used for {ids[image_id]}; ids must be unique")
            ids[image_id] = os.path.basename(entry["file_name"])
        captions: dict[str, list[str]] = {}
        for i, entry in enumerate(data["annotations"]):
            where = f"{path}: annotations[{i}]"
            if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
                raise ModelTestError(f"{where} needs an 'image_id' and a 'caption' (text), got {show_json(entry)}")
            image_id = check_id(entry["image_id"], where, "image_id")
            if image_id not in ids:
                raise ModelTestError(f"{where} has image_id {image_id!r}, which 'images' lacks")
            captions.setdefault(ids[image_id], []).append(entry["caption"])
        missing = sorted(name for name in images if not captions.get(name))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelTestError(f"{path}: {len(missing)} image(s) have no reference caption: {shown}; "
                                 "evaluate only annotated images (--image_list) or drop annotations_path")  # fmt: skip
        return {name: captions[name] for name in images}

    # -- scoring --------------------------------------------------------------------------------
    def record_fields(self, prediction: str) -> dict:
        return {"scoring_text": strip_grounding(prediction)}

    def corpus_metrics(self, records: list[dict]) -> list[tuple[str, int, float]]:
        if not self.config.annotations_path or not records:
            return []
        # the references come from the annotations as loaded now (resumed records may predate them)
        predictions = {r["id"]: strip_grounding(r["prediction"] or "") for r in records}
        scores = coco_caption_scores(predictions, {k: self.references[k] for k in predictions})
        return [(name, len(records), scores[name]) for name in CORPUS_METRICS]

    # -- the seed's caption JSON ------------------------------------------------------------------
    @staticmethod
    def rst_path(paths: RunPaths, family: str) -> Path:
        # family: the run's device family, or in score-only mode the input's (output.predictions_family)
        return paths.result_csv.parent / f"{family.lower()}_coco_rst.json"

    def check_outputs(self, paths: RunPaths, family: str, done: dict, overwrite: bool) -> None:
        path = self.rst_path(paths, family)
        if overwrite or not path.exists():
            return
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = None
        ours = {r["id"]: r["prediction"] for r in done.values() if r.get("error") is None}
        if isinstance(existing, dict) and all(k in ours and ours[k] == v for k, v in existing.items()):
            return  # made from these samples (an earlier or shorter run): rewriting it loses nothing
        raise ModelTestError(f"{path} exists and holds captions that are not among this run's samples; "
                             "pass --overwrite to replace it (this also discards the earlier samples), "
                             "or choose another --output_dir")  # fmt: skip

    def write_outputs(self, records: list[dict], paths: RunPaths, family: str) -> dict[str, Path]:
        captions = {r["id"]: r["prediction"] for r in records if r["error"] is None}
        path = self.rst_path(paths, family)
        atomic_write(path, json.dumps(captions, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
        return {"captions": path}
