"""TextVQA (val), scored with VQA accuracy.

Dataset formats:
- the seed's layout: `textvqa_val.jsonl`, one {"image", "question", "question_id", "answer"} per line,
  with `textvqa_val_annotations.json` beside it ({"annotations": [{"question_id", "answers":
  [{"answer", ...} x10]}]}). Image paths are absolute or relative to the jsonl's folder.
- the same data saved locally with the `datasets` library (`save_to_disk`): columns question_id,
  question, image (an Image feature or a path) and answers (a list of strings).
Reference: Qwen-VL eval_mm/evaluate_vqa.py (prompt `<img>{image}</img>{question} Answer:`, greedy,
10 new tokens) and the TextVQA/EvalAI evaluator (mmf m4c_evaluators.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelTestError
from .base import Sample, Task, add_unique_id, check_id, json_type, read_json, read_jsonl_lines, show_json

ANNOTATIONS_SUFFIX = "_annotations.json"


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

    def load(self, dataset_path: str | None = None, limit: int | None = None) -> list[Sample]:
        path = Path(self.dataset_path(dataset_path))
        if path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
            rows = self._load_hf_disk(path)
        else:
            if path.is_dir():
                candidates = sorted(path.glob("*.jsonl"))
                if len(candidates) != 1:
                    raise ModelTestError(f"{path}: expected one .jsonl file (textvqa_val.jsonl) or a saved datasets folder")
                path = candidates[0]
            rows = self._load_jsonl(path)
        if not rows:
            raise ModelTestError(f"{path}: the dataset is empty")
        seen: dict = {}
        for row in rows:
            add_unique_id(seen, row.id, str(path), fix="ids must be unique")
        return rows[:limit] if limit else rows

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

    # -- a datasets folder -----------------------------------------------------------------------
    def _load_hf_disk(self, path: Path) -> list[Sample]:
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a bad folder
            raise ModelTestError(f"{path}: cannot load the saved dataset: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            split = next((s for s in ("validation", "val", "test", "train") if s in ds), None) or next(iter(ds))
            ds = ds[split]
        need = {"question_id", "question", "image", "answers"}
        if not need <= set(ds.column_names):
            raise ModelTestError(f"{path}: missing column(s) {sorted(need - set(ds.column_names))}; have {ds.column_names}")
        if isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))  # decode in the backend, not here
        cols = ds.select_columns(sorted(need)).to_dict()
        samples = []
        for i, (qid, question, image, answers) in enumerate(
            zip(cols["question_id"], cols["question"], cols["image"], cols["answers"], strict=True)
        ):
            where = f"{path}: row {i}"
            check_id(qid, where)
            where += f" (question_id {qid!r})"
            if not isinstance(question, str) or not question:
                raise ModelTestError(f"{where}: 'question' must be non-empty text, got {show_json(question)}")
            if not answers:
                raise ModelTestError(f"{path}: row {i} (question_id {qid!r}) has no answers")
            if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
                raise ModelTestError(f"{where}: 'answers' must be a list of text, got {show_json(answers)}")
            if isinstance(image, str):
                if not os.path.isabs(image):
                    image = str(path / image)
                shown = image
            else:
                shown = (image or {}).get("path") or f"{path.name}[{i}]"
            samples.append(self._sample(qid, image, question, list(answers), shown))
        return samples

    def _sample(self, qid, image, question: str, answers: list, shown: str) -> Sample:
        parts = [{"image": image}, {"text": self.question_text(question)}]
        return Sample(qid, parts, answers, self.subject, shown, {"question": question})
