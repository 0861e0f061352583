"""The evaluation loop: samples -> requests -> backend -> predictions -> scores -> samples.jsonl -> results.

Every check on the input happens before the model loads. Each finished sample is appended to
samples.jsonl at once; re-running the same command skips what is there (resume) and ends with the
same results as an uninterrupted run. A sample that fails is recorded with its reason, scored 0 and
counted; the run goes on, and exits 3 at the end when errors exceed --max_error_rate. Under torchrun
the samples are shared out among data-parallel groups (modeltest/parallel.py) and rank 0 writes
what a single process writes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .backends.base import Backend, Generation, Request, backend_class, check_model_path, create_backend
from .config import TRANSPORT_KEYS, ModelConfig, TaskConfig, notices, to_dict
from .errors import EXIT_BAD_INPUT, EXIT_TOO_MANY_ERRORS, ModelTestError
from .output import (
    CSV_COLUMNS,
    JsonlAppender,
    RunPaths,
    atomic_write,
    dataset_fingerprint,
    device_family,
    endpoint_paths,
    predictions_family,
    probe_writable,
    read_samples,
    run_paths,
    score_only_paths,
    write_csv,
    write_json,
)
from .parallel import Layout, RunLock, broadcast, gather, init, layout, shard_path, shards, share
from .stats import Uncertainty
from .tasks import Sample, Task, get_task

PREDICTIONS_MODEL_NAME = "predictions"
ENDPOINT_FAMILY = "OPENAI"  # an endpoint's runs, where a run has NPU/GPU/CPU (coco_caption: openai_coco_rst.json)
REFRESH_S = 30.0  # the results CSV and JSON are rewritten at most this often while a run goes
# need_logits: the output distributions of the first LOGITS_TOKENS tokens of the first LOGITS_SAMPLES samples
# (dataset order, the same in every run) are kept, float32, for `modeltest compare --logits`
LOGITS_SAMPLES = 8
LOGITS_TOKENS = 16


@dataclass
class RunOptions:
    output_dir: str
    backend: str | None = None
    device: str | None = None
    batch_size: int = 1
    tp: int | None = None  # None: the world's processes / dp (all of them when dp is None too)
    dp: int | None = None  # data-parallel groups; None: the world / tp
    check_only: bool = False  # check every input and the output folder, load nothing, write nothing
    retry_errors: bool = True  # samples an earlier run recorded as failed are done again
    history: str | None = None  # a SQLite history database the finished run is recorded in
    limit: int | None = None
    seed: int = 0  # how a task that samples --limit draws them (coco_caption); the same seed, the same sample
    predictions: str | None = None
    save_debug: bool = False
    overwrite: bool = False
    max_error_rate: float = 0.0
    progress: bool = True


@dataclass
class RunResult:
    rows: list[list]
    value: float
    total: int
    errors: int
    paths: RunPaths
    exit_code: int = 0
    summary: dict = field(default_factory=dict)


def run(model_cfg: ModelConfig | None, task_cfg: TaskConfig, opts: RunOptions, backend: Backend | None = None) -> RunResult:
    """Run one task. `backend` may be passed in ready-made (tests, benchmarks); otherwise it is built
    from the model config after every input check has passed, and only if there is work left.
    A performance task (task_type performance / performance_maxbs) is measured, not scored: its own loop."""
    if task_cfg.task_type != "precision":
        from .tasks.performance import run_performance

        return run_performance(model_cfg, task_cfg, opts, backend)
    started = time.time()
    task: Task = get_task(task_cfg.task_name)(task_cfg, model_cfg)
    if opts.batch_size < 1:
        raise ModelTestError(f"--batch_size must be >= 1, got {opts.batch_size}")
    if not 0.0 <= opts.max_error_rate <= 1.0:
        raise ModelTestError(f"--max_error_rate must be between 0 and 1, got {opts.max_error_rate}")
    samples = task.load()

    predictions = None
    if opts.predictions:
        from .backends.predictions import PredictionsBackend, load_predictions

        predictions = load_predictions(opts.predictions)
        samples = _select_predicted(samples, predictions, opts.predictions)
        backend = PredictionsBackend({str(s.id): predictions[str(s.id)] for s in samples})
    samples = task.select(samples, opts.limit, opts.seed)

    backend_name = "predictions" if predictions is not None else (opts.backend or (model_cfg.backend if model_cfg else None))
    if backend_name is None:
        raise ModelTestError("no model config: pass --model_config_path, or --predictions to score answers made elsewhere")
    lay = layout(opts.tp, opts.dp, planned=opts.check_only)
    if predictions is not None and lay.world > 1:
        raise ModelTestError("score-only mode (--predictions) runs in one process; launch it without torchrun")
    if lay.main and not opts.check_only:  # (mm_run.sh's pre-flight stays quiet: the run itself says it)
        for line in notices(model_cfg if predictions is None else None, task_cfg, backend_name):
            print(f"modeltest: note: {line}", file=sys.stderr)
    if task_cfg.need_logits and backend_name != "engine":
        raise ModelTestError(f"need_logits: true needs the engine backend (the {backend_name} backend returns no "
                             "output distributions); set need_logits: false or use --backend engine")  # fmt: skip
    # an endpoint (--backend openai): no model folder, no device here; its check names the served model
    remote = predictions is None and backend_class(backend_name).remote
    if remote:
        if lay.world > 1:
            raise ModelTestError(f"an endpoint (--backend {backend_name}) runs the model on its own devices: run the "
                                 "harness as one process, without torchrun (--num_concurrent sets the requests in "
                                 "flight)")  # fmt: skip
        if lay.main and not opts.check_only:  # flags that pick this machine's device or batch: nothing to pick
            for flag, given in (("--device", opts.device), ("--batch_size", opts.batch_size != 1)):
                if given:
                    print(f"modeltest: note: {flag} does not apply on the {backend_name} backend: the endpoint "
                          "runs the model (--num_concurrent sets the requests in flight)", file=sys.stderr)  # fmt: skip
    if backend is None:
        if remote:  # before anything is written: the endpoint answers, with this key, and serves the model
            backend_class(backend_name).check(model_cfg, lay.tp)
        else:
            check_model_path(model_cfg)  # before anything is written or loaded
        if lay.tp > 1 and not backend_class(backend_name).supports_tp:
            raise ModelTestError(f"the {backend_name} backend does not run tensor parallel (--tp {lay.tp}): use "
                                 f"--backend engine, or --dp {lay.world} for a copy of the model per device")  # fmt: skip
    model_name = model_cfg.model_name if model_cfg and predictions is None else PREDICTIONS_MODEL_NAME
    defaults = model_cfg or ModelConfig(model_name=PREDICTIONS_MODEL_NAME)
    if predictions is not None:  # score-only: no device or dtype made these answers here; none is claimed
        device, family, dtype = None, predictions_family(opts.predictions), None
        paths = score_only_paths(opts.output_dir, task_cfg.task_type, task_cfg.task_name, opts.predictions)
    elif remote:  # the endpoint's device and dtype are not this machine's to name; its URL and model are
        device, family, dtype = None, ENDPOINT_FAMILY, None
        paths = endpoint_paths(opts.output_dir, task_cfg.task_type, task_cfg.task_name, model_cfg.served_model)
    else:
        device, family = _device(backend_name, opts.device, backend, lay)
        dtype = defaults.data_type
        paths = run_paths(opts.output_dir, family, task_cfg.task_type, task_cfg.task_name, dtype, model_name,
                          defaults.model_type, opts.batch_size, lay.tp)  # fmt: skip
    task_fingerprint = to_dict(task_cfg)
    task_fingerprint.pop("annotations_path")  # references only score; the samples do not depend on them
    fingerprint = {
        "model": to_dict(model_cfg) if model_cfg and predictions is None else None,
        "task": task_fingerprint,
        "backend": backend_name,
        "device": None if remote else family,
        "max_new_tokens": task.max_new_tokens,
        "predictions": _file_digest(opts.predictions) if opts.predictions else None,
    }
    if remote:  # (api_key is never in to_dict's output)
        fingerprint["endpoint"] = {"base_url": model_cfg.base_url, "served_model": model_cfg.served_model}
    if opts.check_only:
        return _check_only(task, model_cfg, backend_name, backend, paths, fingerprint, family, opts, lay, remote)

    init(lay)
    lock, created = None, None
    try:
        if lay.main:  # rank 0 decides what is left to do; the others learn it from it
            try:
                _check_writable(paths)
                lock = RunLock(paths.debug_dir).acquire()
                done, failed = _resume(paths, fingerprint, opts.overwrite, retry_errors=opts.retry_errors)
                task.check_outputs(paths, family, done, opts.overwrite)
                status = ("ok", set(done))
            except ModelTestError as e:
                status = ("error", str(e))
        status = broadcast(status if lay.main else None, lay)
        if status[0] == "error":
            raise ModelTestError(status[1])
        todo = [s for s in samples if s.id not in status[1]]
        if lay.main:
            _say_resuming(samples, todo, failed, opts.retry_errors, paths)
        mine = share(todo, lay)

        load_time = 0.0
        if todo and backend is None:  # every rank loads (a tensor-parallel engine forms its groups together)
            for key, value in (model_cfg.env or {}).items():
                os.environ[key] = value
            t0 = time.perf_counter()
            backend = created = create_backend(backend_name, model_cfg, device, lay.tp, opts.batch_size,
                                               opts.progress)  # fmt: skip
            load_time = time.perf_counter() - t0

        records = {s.id: done[s.id] for s in samples if s.id in done} if lay.main else {}

        def refresh(so_far: dict) -> None:  # rank 0, while the run goes: the results so far
            finished = [so_far[s.id] for s in samples if s.id in so_far]
            _write_results(task, finished, paths, opts, fingerprint, {"wall_s": time.time() - started}, device,
                           model_name, lay, {}, complete=False, dtype=dtype)  # fmt: skip

        logit_ids = {s.id for s in samples[:LOGITS_SAMPLES]} if task_cfg.need_logits else set()
        infer_time = _loop(task, backend, mine, records, paths, opts, lay, refresh, logit_ids) if mine else 0.0
        theirs = gather([records[s.id] for s in mine] if lay.leader and not lay.main else None, lay)
        if not lay.main:
            return RunResult([], 0.0, len(samples), 0, paths)

        _merge(paths, records, [r for part in theirs if part for r in part], opts, lay)
        ordered = [records[s.id] for s in samples]
        timings = {
            "wall_s": time.time() - started,
            "model_load_s": load_time,
            "inference_s": infer_time,
            "samples_this_run": len(todo),
            "samples_per_s": len(todo) / infer_time if infer_time > 0 else None,
            "resumed_samples": len(samples) - len(todo),
        }
        result = _finish(task, ordered, paths, opts, fingerprint, timings, device, family, model_name, lay,
                         dtype)  # fmt: skip
        _after(result, opts)
        return result
    finally:
        if created is not None:  # (an interrupted openai backend stops its requests in flight)
            created.close()
        if lock:
            lock.release()


def _check_only(task, model_cfg, backend_name, backend, paths, fingerprint, family, opts, lay,
                checked: bool) -> RunResult:  # fmt: skip
    """--check_only (mm_run.sh's pre-flight before torchrun): every check a run makes before loading —
    the backend's own (the model splits --tp ways; an endpoint's, `checked` already), the output
    folder's lock, a resumed folder's configuration, the task's outputs — then nothing is loaded and
    nothing is written."""
    if backend is None and not checked:
        backend_class(backend_name).check(model_cfg, lay.tp)
    _check_writable(paths, dry=True)
    RunLock(paths.debug_dir).probe()
    done, _ = _resume(paths, fingerprint, opts.overwrite, dry=True, retry_errors=opts.retry_errors)
    task.check_outputs(paths, family, done, opts.overwrite)
    print(f"modeltest: check passed; {len(done)} samples done already ({paths.debug_dir})", file=sys.stderr)
    return RunResult([], 0.0, 0, 0, paths)


def _select_predicted(samples: list[Sample], predictions: dict, path: str) -> list[Sample]:
    """Score-only mode scores the questions the file answers; an id the dataset lacks is an error."""
    known = {str(s.id) for s in samples}
    unknown = [q for q in predictions if str(q) not in known]
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise ModelTestError(f"{path}: {len(unknown)} question_id(s) are not in the dataset: {shown}")
    for q in list(predictions):
        predictions[str(q)] = predictions.pop(q)
    chosen = [s for s in samples if str(s.id) in predictions]
    if len(chosen) < len(samples):
        print(f"modeltest: {path} answers {len(chosen)} of the {len(samples)} questions; scoring those", file=sys.stderr)
    return chosen


def _device(backend_name: str, device: str | None, backend: Backend | None, lay: Layout) -> tuple[str, str]:
    """The device this rank runs on, and its family (the seed's folder name). Under torchrun an
    accelerator without an index is LOCAL_RANK's."""
    from engine import DeviceError, resolve_device

    if backend is not None and getattr(backend, "device", None):
        device = backend.device
    try:
        device = resolve_device(device)
    except DeviceError as e:
        raise ModelTestError(str(e)) from None
    if lay.world > 1 and device in ("cuda", "npu"):
        device = f"{device}:{os.environ.get('LOCAL_RANK', '0')}"
    return device, device_family(device)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _resume(paths: RunPaths, fingerprint: dict, overwrite: bool, dry: bool = False,
            retry_errors: bool = True) -> tuple[dict, set]:  # fmt: skip
    """The records an earlier run of the same configuration finished (its data-parallel shards folded
    into samples.jsonl first), and the ids of those that failed; a different configuration is refused
    while samples made with it are there (a run that failed before its first sample blocks nothing).
    With `retry_errors` the samples that failed are dropped, so this run does them again. `dry`: look,
    change nothing."""
    if overwrite:
        if dry:
            return {}, set()
        for p in (paths.samples, paths.run_config, *shards(paths.samples), *paths.debug_dir.glob("logits/*")):
            if p.exists():
                p.unlink()
    records = read_samples(paths.samples, repair=not dry)
    for shard in shards(paths.samples):
        extra = {k: v for k, v in read_samples(shard, repair=not dry).items() if k not in records}
        if not dry:
            _append(paths.samples, extra.values())
            shard.unlink()
        records.update(extra)
    if paths.run_config.exists() and records:
        old, new = _flatten(_read_run_config(paths.run_config)), _flatten(json.loads(json.dumps(fingerprint)))
        changed = sorted(k for k in old.keys() | new.keys()
                         if old.get(k) != new.get(k) and k.removeprefix("model.") not in TRANSPORT_KEYS)  # fmt: skip
        if changed:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
            raise ModelTestError(
                f"{paths.debug_dir} holds samples made with a different configuration ({shown}); "
                "rerun with --overwrite to start over, or choose another --output_dir"
            )
    elif not dry:
        write_json(paths.run_config, fingerprint)
    failed = {k for k, r in records.items() if r.get("error") is not None}
    if retry_errors and failed:
        records = {k: r for k, r in records.items() if k not in failed}
        if not dry:  # samples.jsonl keeps one record per sample: the failed ones go, their retries come
            atomic_write(paths.samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()))
    return records, failed


def _say_resuming(samples: list[Sample], todo: list[Sample], failed: set, retry_errors: bool, paths: RunPaths) -> None:
    """Rank 0, when an earlier run's samples are reused: how many, from where, and what is left - so a
    run that looks short, or an output folder reused by mistake, is seen at once."""
    ids = {s.id for s in samples}
    failed = failed & ids  # an earlier run may have done samples this one (--limit) leaves out
    reused = len(samples) - len(todo)
    if not reused and not failed:
        return
    if not retry_errors and failed:
        note = f" ({len(failed)} of them failed and are kept: --no_retry_errors)"
    elif failed:
        note = f" ({len(failed)} that failed before are retried)"
    else:
        note = ""
    print(f"modeltest: resuming: {reused} of {len(samples)} samples already done in {paths.samples}; "
          f"{len(todo)} to go{note}", file=sys.stderr)  # fmt: skip


def _check_writable(paths: RunPaths, dry: bool = False) -> None:
    """Before any work: the results and debug folders can be created and written (a --output_dir
    that is a file, read-only or on a full disk is found now, not after the run). `dry`: only look."""
    for folder in (paths.result_csv.parent, paths.debug_dir):
        try:
            if dry:
                existing = next(p for p in (folder, *folder.parents) if p.exists())
                if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                    raise PermissionError(13, "not a writable folder", str(existing))
                continue
            probe_writable(folder, create=True)
        except OSError as e:
            where = e.filename or folder
            raise ModelTestError(f"cannot write the run's outputs under {where}: {e.strerror}; choose another "
                                 "--output_dir (or free space)") from None  # fmt: skip


def _read_run_config(path: Path) -> dict:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        stored = None
    if not isinstance(stored, dict):
        raise ModelTestError(f"{path}: not a run configuration (empty or damaged); delete it to resume with this "
                             "configuration, or rerun with --overwrite")  # fmt: skip
    return stored


def _append(path: Path, records) -> None:
    with JsonlAppender(path) as log:
        for rec in records:
            log.write(rec)


def _merge(paths: RunPaths, records: dict, theirs: list[dict], opts: RunOptions, lay: Layout) -> None:
    """Rank 0: the other data-parallel groups' results into samples.jsonl (and the seed's debug txt),
    and their shards removed."""
    new = [r for r in theirs if r["id"] not in records]
    _append(paths.samples, new)
    records.update((r["id"], r) for r in new)
    if opts.save_debug and new:
        with open(paths.debug_dir / f"outputs_{datetime.now():%Y%m%d_%H%M%S}_dp.txt", "a", encoding="utf-8") as f:
            f.writelines(_debug_line(rec) for rec in new)
    for rank in range(1, lay.world):
        path = shard_path(paths.samples, rank)
        if path.exists():
            path.unlink()


def _save_distributions(paths: RunPaths, sample_id, gen: Generation) -> str:
    """A sample's output distributions ([tokens, vocab] float32) and token ids in the debug folder; the
    file's name relative to it."""
    import torch
    from safetensors.torch import save_file

    name = "logits/" + hashlib.sha256(str(sample_id).encode()).hexdigest()[:16] + ".safetensors"
    path = paths.debug_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"logprobs": gen.extra["logprobs"].float().contiguous(),
               "token_ids": torch.tensor(gen.extra["token_ids"], dtype=torch.long)}, str(path))  # fmt: skip
    return name


def _debug_line(rec: dict) -> str:
    """The seed's outputs_<time>.txt line: [output, model input, e2e_time]."""
    return json.dumps([rec["raw_output"], rec["prompt"], rec["e2e_time"]], ensure_ascii=False) + "\n"


def _generate(backend: Backend, requests: list[Request], emit) -> None:
    """Generate a batch, passing each result to `emit(index, generation)` (as it finishes, for a
    streaming backend). When the backend raises, the requests without a result are retried one by
    one, so only the culprit fails."""
    done: set[int] = set()

    def once(i: int, gen: Generation) -> None:
        if i not in done:
            done.add(i)
            emit(i, gen)

    try:
        if backend.streams:
            out = backend.generate(requests, on_result=once)
        else:
            out = backend.generate(requests)
        if len(out) != len(requests):
            raise RuntimeError(f"backend returned {len(out)} results for {len(requests)} requests")
        for i, gen in enumerate(out):
            once(i, gen)
    except Exception as e:
        if len(requests) == 1:
            once(0, Generation(error=f"{type(e).__name__}: {e}"))
            return
        for i, request in enumerate(requests):
            if i not in done:
                _generate(backend, [request], lambda _, gen, i=i: once(i, gen))


def _record(task: Task, sample: Sample, gen: Generation) -> dict:
    prediction = task.postprocess(gen.text) if gen.error is None else ""
    score = task.score(prediction, sample) if gen.error is None else 0.0
    return {
        "id": sample.id,
        "subject": sample.subject,
        "image": sample.image,
        "question": sample.extra.get("question"),
        "prompt": gen.prompt if gen.prompt is not None else task.render(sample),
        "raw_output": gen.text,
        "prediction": prediction,
        "references": [r["answer"] if isinstance(r, dict) else r for r in sample.references],
        "score": score,
        "error": gen.error,
        "input_tokens": gen.input_tokens,
        "output_tokens": gen.output_tokens,
        "e2e_time": gen.e2e_time,
        # need_truncate_input: the prompt tokens cut from the left to fit requested_max_input_length
        **({"input_truncated": gen.extra["input_truncated"]} if gen.extra.get("input_truncated") else {}),
        **({"ttft_s": gen.extra["ttft_s"]} if gen.extra.get("ttft_s") is not None else {}),
        # an endpoint that sent no usage: input_tokens / output_tokens are null, not guessed
        **({"usage_reported": False} if gen.extra.get("usage_reported") is False else {}),
        **task.record_fields(prediction),
    }


def _loop(task, backend, todo, records, paths: RunPaths, opts: RunOptions, lay: Layout, refresh=None,
          logit_ids: set = frozenset()) -> float:  # fmt: skip
    """Run `todo` through the backend; a group leader records each result as it finishes (rank 0 into
    samples.jsonl, the other leaders into their shard), the other ranks of a group only compute.
    Rank 0 calls `refresh(records)` at most every REFRESH_S seconds. The samples in `logit_ids` keep
    their output distributions (debug folder, logits/)."""
    from tqdm import tqdm

    total_score = sum(r["score"] for r in records.values())
    debug_txt = None
    if opts.save_debug and lay.main:
        debug_txt = open(paths.debug_dir / f"outputs_{datetime.now():%Y%m%d_%H%M%S}.txt", "a", encoding="utf-8")
    log = None
    if lay.leader:
        log = JsonlAppender(paths.samples if lay.main else shard_path(paths.samples, lay.rank))
    bar = tqdm(total=len(records) + len(todo), initial=len(records), unit="sample", desc=task.config.task_name,
               disable=not (opts.progress and lay.main), dynamic_ncols=True)  # fmt: skip
    infer_time = 0.0
    refreshed = time.monotonic()
    try:
        size = max(opts.batch_size, backend.window or 0)
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]

            def emit(i: int, gen: Generation, batch=batch) -> None:
                nonlocal total_score, refreshed
                if log is None:
                    return
                rec = _record(task, batch[i], gen)
                if gen.extra.get("logprobs") is not None:
                    rec["logits"] = _save_distributions(paths, batch[i].id, gen)
                log.write(rec)
                records[batch[i].id] = rec
                total_score += rec["score"]
                if debug_txt:
                    debug_txt.write(_debug_line(rec))
                    debug_txt.flush()
                bar.update(1)
                bar.set_postfix({task.metric.name: f"{total_score / len(records):.4f}"}, refresh=False)
                if refresh is not None and lay.main and time.monotonic() - refreshed >= REFRESH_S:
                    refresh(records)
                    refreshed = time.monotonic()

            t0 = time.perf_counter()
            requests = [task.request(s) for s in batch]
            for req in requests:
                req.distributions = LOGITS_TOKENS if req.id in logit_ids else 0
            _generate(backend, requests, emit)
            infer_time += time.perf_counter() - t0
    finally:
        bar.close()
        if log:
            log.close()
        if debug_txt:
            debug_txt.close()
    return infer_time


def _finish(task: Task, records: list[dict], paths: RunPaths, opts: RunOptions, fingerprint: dict,
            timings: dict, device: str | None, family: str, model_name: str, lay: Layout, dtype: str | None) -> RunResult:  # fmt: skip
    extra_paths = task.write_outputs(records, paths, family)  # first: a scorer that fails loses no output
    rows, spread, summary = _write_results(task, records, paths, opts, fingerprint, timings, device, model_name, lay,
                                           extra_paths, complete=True, dtype=dtype)  # fmt: skip
    failed = summary["error_rate"] > opts.max_error_rate
    _print_table(rows, spread, summary["errors"], failed, paths, extra_paths)
    code = EXIT_TOO_MANY_ERRORS if failed else 0
    return RunResult(rows, summary["value"], len(records), summary["errors"], paths, code, summary)


def _write_results(task: Task, records: list[dict], paths: RunPaths, opts: RunOptions, fingerprint: dict,
                   timings: dict, device: str | None, model_name: str, lay: Layout, extra_paths: dict,
                   complete: bool, dtype: str | None) -> tuple[list, list, dict]:  # fmt: skip
    """The results CSV and JSON over `records`. While the run goes (`complete` False) they hold the
    samples finished so far, without the corpus metrics (those score all captions at once)."""
    cfg = task.config
    metric = task.metric
    shots = cfg.shots
    scores = [r["score"] for r in records]
    value = metric.aggregate(scores)
    rows = [[cfg.task_name, shots, len(records), sum(scores), metric.name, value]]
    spread = [Uncertainty.of(scores)]  # per row: the uncertainty over samples (None: a corpus metric)
    corpus = task.corpus_metrics(records) if complete else []
    rows += [[cfg.task_name, shots, total, None, name, v] for name, total, v in corpus]  # Pass: not a count
    spread += [None] * len(corpus)
    subjects = list(dict.fromkeys(r["subject"] for r in records))
    if len(subjects) > 1:  # one subject's row would repeat the task row's numbers: it is left out
        for subject in subjects:
            sub = [r["score"] for r in records if r["subject"] == subject]
            rows.append([subject, shots, len(sub), sum(sub), metric.name, metric.aggregate(sub)])
            spread.append(Uncertainty.of(sub))
    errors = sum(1 for r in records if r["error"] is not None)
    error_rate = errors / len(records) if records else 0.0
    csv_rows = [[r[0], r[1], r[2], None if r[3] is None else round(r[3], 6), r[4], round(r[5], 6)] for r in rows]
    write_csv(paths.result_csv, csv_rows)
    summary = {
        "task": cfg.task_name,
        "model": model_name,
        "metric": metric.name,
        "normalizer": cfg.metric.normalizer,
        "value": value,
        "stderr": spread[0].stderr,
        "ci95": list(spread[0].ci95),
        "complete": complete,
        "dataset_fingerprint": dataset_fingerprint(records),
        "corpus_metrics": {name: v for name, _, v in corpus},
        "subjects": subjects,  # named here even when a single subject has no row of its own
        "total": len(records),
        "pass": sum(scores),
        "errors": errors,
        "error_rate": error_rate,
        "max_error_rate": opts.max_error_rate,
        "rows": [{**dict(zip(CSV_COLUMNS, r, strict=True)), "stderr": u.stderr if u else None,
                  "ci95": list(u.ci95) if u else None} for r, u in zip(rows, spread, strict=True)],
        "device": device,
        "dtype": dtype,
        **({"endpoint": fingerprint["endpoint"]} if "endpoint" in fingerprint else {}),  # base_url, served model
        "batch_size": opts.batch_size,
        "tp": lay.tp,
        "dp": lay.dp,
        "timings": timings,
        "config": fingerprint,
        "versions": _versions(),
        "git_commit": _git_commit(),
        ("finished_at" if complete else "updated_at"): datetime.now().isoformat(timespec="seconds"),
        "paths": {"csv": str(paths.result_csv), "samples": str(paths.samples),
                  **{k: str(p) for k, p in extra_paths.items()}},
    }  # fmt: skip
    write_json(paths.result_json, summary)
    return csv_rows, spread, summary


def _after(result: RunResult, opts: RunOptions) -> None:
    """A finished run: recorded in the history (--history), and how far it is from its reference figure
    when results/references/ has one for its model, task, metric, evaluator and dtype. Either failing
    (a history that cannot be written, a broken reference file) is one line; the run's results stay,
    and the exit code is the run's own, else 2."""
    from . import history, references

    def report() -> None:
        ref = references.match(references.for_model(result.summary.get("model")), result.summary)
        if ref is not None:
            g = references.gate(ref, result.summary["value"], result.summary["stderr"])
            print(f"reference: {g['reference']:.4f} (tolerance {g['tolerance']:g}; {ref.file.name}); this run "
                  f"{g['candidate']:.4f} ± {g['stderr']:.4f}, {g['diff']:+.4f}: {g['verdict']}")  # fmt: skip

    def record() -> None:
        run_id = history.record_run(opts.history, result.summary, result.paths.result_json, opts.output_dir)
        print(f"history: run {run_id} in {opts.history}")

    for step in (record, report) if opts.history else (report,):
        try:
            step()
        except ModelTestError as e:
            print(f"modeltest: {e} (the run's results are written: {result.paths.result_json})", file=sys.stderr)
            result.exit_code = result.exit_code or EXIT_BAD_INPUT


def _print_table(rows, spread, errors: int, failed: bool, paths: RunPaths, extra_paths: dict) -> None:
    from tabulate import tabulate
    from termcolor import colored

    color = "red" if failed else "green"
    shown = [r[:5] + [colored(f"{r[5]:.4f}" + (f" ± {u.stderr:.4f}" if u else ""), color)]
             for r, u in zip(rows, spread, strict=True)]  # fmt: skip
    print(tabulate(shown, headers=CSV_COLUMNS, tablefmt="github"))
    status = colored(f"errors: {errors}", "red" if errors else "green")
    print(f"{status}\nresults: {paths.result_csv}\nsamples: {paths.samples}")
    for label, path in extra_paths.items():
        print(f"{label}: {path}")


@functools.cache  # one process, one install: asked once, not at every refresh
def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("modeltest", "torch", "transformers", "open_clip_torch", "torch_npu"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@functools.cache
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=True)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
