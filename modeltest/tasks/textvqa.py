"""TextVQA (val), scored with VQA accuracy.

Dataset sources (the first that is set wins: --dataset_path, local_dataset_path, hf_dataset_path):
- the seed's layout: `textvqa_val.jsonl`, one {"image", "question", "question_id", "answer"} per line,
  with `textvqa_val_annotations.json` beside it ({"annotations": [{"question_id", "answers":
  [{"answer", ...} x10]}]}). Image paths are absolute or relative to the jsonl's folder.
- a folder in the hub's own layout (lmms-lab/textvqa downloaded as files): `data/<split>-*.parquet`
  (or those files in the folder itself), columns question_id, question, image (the `datasets` Image
  struct {bytes, path}, bytes or a path), answers (a list of strings), optionally image_id.
- the same data saved locally with the `datasets` library (`save_to_disk`): a Dataset or DatasetDict.
- `hf_dataset_path` (e.g. lmms-lab/textvqa), read with `datasets.load_dataset`: from the hub, or from
  the datasets cache when offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
Where there are splits, `hf_dataset_split` names the one read; unset, "validation" (lmms-eval's
textvqa_val reads that split by name, with no fallback). Images stored as bytes stay encoded
(`ImageBytes`) until a backend opens them.
Reference: Qwen-VL eval_mm/evaluate_vqa.py (prompt `<img>{image}</img>{question} Answer:`, greedy,
10 new tokens) and the TextVQA/EvalAI evaluator (mmf m4c_evaluators.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..backends.base import ImageBytes
from ..errors import ModelTestError
from .base import Sample, Task, add_unique_id, check_id, json_type, read_json, read_jsonl_lines, show_json

ANNOTATIONS_SUFFIX = "_annotations.json"
DEFAULT_SPLIT = "validation"  # lmms-eval's textvqa_val: test_split: validation
NEED = ("question_id", "question", "image", "answers")  # the columns read from parquet and datasets sources
# file-type magic numbers -> the extension an embedded image's name gets (a label only: never opened by name)
MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"))


def _extension(data: bytes) -> str:
    return next((ext for magic, ext in MAGIC if data.startswith(magic)), "")


def _parquet_files(path: Path) -> dict[str, list[Path]]:
    """{split: its parquet files} in the hub's layout: `<split>-00000-of-00003.parquet` (or `<split>.parquet`)
    in `path/data/` (as lmms-lab/textvqa publishes them), else in `path` itself."""
    folder = path / "data" if (path / "data").is_dir() else path
    out: dict[str, list[Path]] = {}
    for file in sorted(folder.glob("*.parquet")):
        out.setdefault(file.stem.split("-", 1)[0], []).append(file)
    return out


class TextVQA(Task):
    name = "textvqa"
    default_max_new_tokens = 10
    default_metric = "vqa_accuracy"
    metric_types = ("vqa_accuracy", "exact_match")

    def question_text(self, question: str) -> str:
        mm = self.model.mm_model if self.model else None
        if mm and (mm.prompt_prefix is not None or mm.prompt_suffix is not None):
            return (mm.prompt_prefix or "") + question + (mm.prompt_suffix or "")
        template = self.config.prompt or "{question} Answer:"
        return template.replace("{question}", question)

    @property
    def split(self) -> str:
        return self.config.hf_dataset_split or DEFAULT_SPLIT

    def load(self, dataset_path: str | None = None, limit: int | None = None) -> list[Sample]:
        name = self.config.hf_dataset_path
        if not (dataset_path or self.config.local_dataset_path) and name:  # a local copy wins over the hub
            where, rows = f"hf_dataset_path {name} (split {self.split!r})", self._load_hub(name)
        else:
            where, rows = self._load_local(Path(self.dataset_path(dataset_path)))
        if not rows:
            raise ModelTestError(f"{where}: the dataset is empty")
        seen: dict = {}
        for row in rows:
            add_unique_id(seen, row.id, where, fix="ids must be unique")
        return rows[:limit] if limit else rows

    def _load_local(self, path: Path) -> tuple[str, list[Sample]]:
        """(what to name the source in errors, its samples) for --dataset_path / local_dataset_path."""
        if not path.is_dir():
            return str(path), self._load_jsonl(path)
        if any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return self._load_hf_disk(path)
        candidates = sorted(path.glob("*.jsonl"))
        if len(candidates) == 1:
            return str(candidates[0]), self._load_jsonl(candidates[0])
        if not candidates and _parquet_files(path):
            return str(path), self._load_parquet(path)
        found = f"found {len(candidates)} .jsonl files" if candidates else "found none of them"
        raise ModelTestError(f"{path}: expected one .jsonl file (textvqa_val.jsonl), a saved datasets folder, or "
                             f"the hub's data/<split>-*.parquet files (lmms-lab/textvqa); {found}")  # fmt: skip

    # -- the seed's jsonl + annotations ---------------------------------------------------------
    def _load_jsonl(self, path: Path) -> list[Sample]:
        annotations = self._read_annotations(path)
        samples, missing = [], []
        for lineno, row in read_jsonl_lines(path, "dataset file"):
            where = f"{path}:{lineno}"
            for key in ("image", "question", "question_id"):
                if key not in row:
                    qid = row.get("question_id")
                    raise ModelTestError(f"{where}: the row (question_id {qid!r}) has no {key!r}")
            qid = check_id(row["question_id"], where)
            for key in ("image", "question"):
                if not isinstance(row[key], str) or not row[key]:
                    raise ModelTestError(f"{where}: {key!r} must be non-empty text, got {show_json(row[key])}")
            answers = annotations.get(str(qid))
            if answers is None:
                missing.append(qid)
                continue
            image = row["image"]
            if not os.path.isabs(image):  # relative to the jsonl's folder, not the working directory
                image = str(path.parent / image)
            samples.append(self._sample(qid, image, row["question"], answers, image))
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise ModelTestError(
                f"{path}: {len(missing)} question_id(s) have no annotation in {self._annotations_path(path)}: {shown}"
            )
        return samples

    @staticmethod
    def _annotations_path(path: Path) -> Path:
        return path.with_name(path.stem + ANNOTATIONS_SUFFIX)

    def _read_annotations(self, path: Path) -> dict[str, list]:
        """{str(question_id): answers}: ids are matched as text, like everywhere else."""
        ann_path = self._annotations_path(path)
        if not ann_path.exists():
            raise ModelTestError(
                f"annotations file not found: {ann_path} (it must sit beside {path.name}, as in the seed's layout)"
            )
        data = read_json(ann_path, "annotations file")
        shape = '{"annotations": [{"question_id", "answers"}, ...]}'
        if not isinstance(data, dict):
            raise ModelTestError(f"{ann_path}: expected {shape}, got {json_type(data)}")
        entries = data.get("annotations")
        if not isinstance(entries, list):
            got = "no 'annotations' key" if "annotations" not in data else f"'annotations' is {json_type(entries)}"
            raise ModelTestError(f"{ann_path}: expected {shape}; {got}")
        out: dict[str, list] = {}
        first: dict = {}
        for i, entry in enumerate(entries):
            where = f"{ann_path}: annotations[{i}]"
            if not isinstance(entry, dict):
                raise ModelTestError(f'{where}: expected an object {{"question_id", "answers"}}, '
                                     f"got {show_json(entry)}")  # fmt: skip
            answers = entry.get("answers")
            if "question_id" not in entry or not isinstance(answers, list) or not answers:
                raise ModelTestError(f"{where} needs a question_id and a non-empty answers list")
            qid = check_id(entry["question_id"], where)
            for a in answers:
                text = a.get("answer") if isinstance(a, dict) else a
                if not isinstance(text, str):
                    raise ModelTestError(f'{where}: each answer must be text or {{"answer": text}}, '
                                         f"got {show_json(a)}")  # fmt: skip
            out[add_unique_id(first, qid, where, f"annotations[{i}]")] = answers
        return out

    # -- the hub: datasets.load_dataset, a hub-layout parquet folder, a save_to_disk folder ---------
    def _load_hub(self, name: str) -> list[Sample]:
        import datasets

        split = self.split
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # no network and not cached, unknown dataset, unknown split, bad files, ...
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"  # one line, however datasets words it
            fix = ("set hf_dataset_split to one of its splits" if isinstance(e, ValueError) and "split" in str(e)
                   else "download it once with network access (it is then read from the datasets cache), or set "
                   "local_dataset_path (or --dataset_path) to a local copy")  # fmt: skip
            raise ModelTestError(f"hf_dataset_path {name} (split {split!r}): cannot load it: {reason}; {fix}") from None
        return self._from_datasets(ds, f"hf_dataset_path {name} (split {split!r})", None)

    def _load_parquet(self, path: Path) -> list[Sample]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        found = _parquet_files(path)
        files = found.get(self.split)
        if not files:
            raise ModelTestError(f"{path}: no parquet files for split {self.split!r} (data/{self.split}-*.parquet); "
                                 f"it has {sorted(found)}: set hf_dataset_split to one of them")  # fmt: skip
        samples = []
        for file in files:
            try:
                pf = pq.ParquetFile(file)
                have = pf.schema_arrow.names
                missing = sorted(set(NEED) - set(have))
                if missing:
                    raise ModelTestError(f"{file}: missing column(s) {missing}; have {have} (expected "
                                         "lmms-lab/textvqa's columns)")  # fmt: skip
                table = pf.read(columns=[*NEED, *(["image_id"] if "image_id" in have else [])])
            except (pa.ArrowException, OSError) as e:
                raise ModelTestError(f"{file}: not a readable parquet file ({e}); download it again") from None
            # column by column: the image structs come out as {"bytes", "path"} cells, still encoded
            samples += self._samples(str(file), path, {c: table.column(c).to_pylist() for c in table.column_names})
            del table
        return samples

    def _load_hf_disk(self, path: Path) -> tuple[str, list[Sample]]:
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a bad folder
            raise ModelTestError(f"{path}: cannot load the saved dataset: {e}") from None
        where = str(path)
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise ModelTestError(f"{path}: the saved dataset has no split {self.split!r}; it has {sorted(ds)}: "
                                     "set hf_dataset_split to one of them")  # fmt: skip
            ds, where = ds[self.split], f"{path} (split {self.split!r})"
        return where, self._from_datasets(ds, where, path)

    def _from_datasets(self, ds, where: str, base: Path | None) -> list[Sample]:
        import datasets

        missing = sorted(set(NEED) - set(ds.column_names))
        if missing:
            raise ModelTestError(f"{where}: missing column(s) {missing}; have {ds.column_names}")
        if isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))  # decode in the backend, not here
        cols = [*NEED, *(["image_id"] if "image_id" in ds.column_names else [])]
        return self._samples(where, base, ds.select_columns(cols).to_dict())

    def _samples(self, where: str, base: Path | None, cols: dict[str, list]) -> list[Sample]:
        """Samples from columns (NEED, optionally image_id); `where` names the source in errors, `base`
        is the folder relative image paths are resolved against (None: keep them as written)."""
        samples = []
        image_ids = cols.get("image_id") or [None] * len(cols["question_id"])
        for i, (qid, question, image, answers, image_id) in enumerate(
            zip(cols["question_id"], cols["question"], cols["image"], cols["answers"], image_ids, strict=True)
        ):
            at = f"{where}: row {i}"
            check_id(qid, at)
            at += f" (question_id {qid!r})"
            if not isinstance(question, str) or not question:
                raise ModelTestError(f"{at}: 'question' must be non-empty text, got {show_json(question)}")
            if not answers:
                raise ModelTestError(f"{at} has no answers")
            if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
                raise ModelTestError(f"{at}: 'answers' must be a list of text, got {show_json(answers)}")
            source, shown = self._image(image, base, image_id if image_id else qid, at)
            samples.append(self._sample(qid, source, question, list(answers), shown))
        return samples

    @staticmethod
    def _image(cell, base: Path | None, stem, at: str) -> tuple[ImageBytes | str, str]:
        """(what the backend opens, the name samples.jsonl shows) for an image cell: bytes stay encoded.
        Embedded bytes without a path are named `<image_id>.<format>` (the seed's train_images/ names),
        so the dataset fingerprint (image base names) matches the same data in the seed's layout."""
        data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (None, cell)
        if isinstance(path, bytes):
            data, path = path, None
        if data:
            name = path or f"{stem}{_extension(data)}"
            return ImageBytes(bytes(data), name), name
        if isinstance(path, str) and path:
            if base is not None and not os.path.isabs(path):
                path = str(base / path)  # relative to the dataset's folder, not the working directory
            return path, path
        raise ModelTestError(f"{at}: 'image' holds neither image bytes nor a path, got {type(cell).__name__}")

    def _sample(self, qid, image, question: str, answers: list, shown: str) -> Sample:
        parts = [{"image": image}, {"text": self.question_text(question)}]
        return Sample(qid, parts, answers, self.subject, shown, {"question": question})
