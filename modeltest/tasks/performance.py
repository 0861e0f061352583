"""task_type performance and performance_maxbs: the seed's speed measurements, with the same tool and
configs as its accuracy runs.

performance: for each batch size and each case [input tokens, output tokens] of `case_pair`, batches of
that many requests run at once - every prompt exactly the input length in the model's tokens (with
`with_image` one 448x448 image first, its span counted), every generation exactly the output length
(ignore_eos; no end token stops it) - `warmup_rounds` unmeasured, then `rounds` measured and averaged.
The prompts are random tokens and random-noise images, different in every request and round, so no
prefix or image cache serves them: a case measures the same work on every device and in every run.

Writes, per batch size, the seed's CSV (one row per case; a failed case's row holds its error; the
averages of the two throughputs over the cases that ran only in the last row's last two columns) and
beside it a JSON: the same figures plus TTFT / TPOT / inter-token latency / E2E latency mean, p50, p90
and p99 per case, the exact token counts, peak device memory, what the scheduler did, the device and
the software versions. The figures are defined in modeltest/metrics/latency.py.

performance_maxbs: per case, the largest batch size in `batch_size: [smallest, largest]` whose
non-first token time stays under `max_non_first_token_time_ms`, found by bisection (the time grows with
the batch size); every probe in `_round_result.csv`, the answers in `_final_result.csv` (+ JSON).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from datetime import datetime

from ..backends.base import Backend, SampleError, TimedBatch, backend_class, check_model_path, create_backend
from ..config import ModelConfig, TaskConfig, notices, to_dict
from ..errors import EXIT_TOO_MANY_ERRORS, ModelTestError
from ..metrics.latency import HEADLINE, describe
from ..output import RunPaths, endpoint_performance_paths, performance_paths, write_csv, write_json

# task_name of a performance task -> what its prompts are
PERFORMANCE_TASKS = {"synthetic": "random tokens (and a random-noise image) made to the exact input length"}
COLUMNS = ["Model", "Batchsize", "In_seq", "Out_seq", "Total time(s)", "First token time(ms)",
           "Non-first token time(ms)", "Non-first token Throughput(Tokens/s)", "E2E Throughput(Tokens/s)",
           "Non-first token Throughput Average(Tokens/s)", "E2E Throughput Average(Tokens/s)"]  # fmt: skip
ROUND_COLUMNS = COLUMNS[:9] + ["Max non-first token time(ms)", "Under limit"]
FINAL_COLUMNS = ["Model", "In_seq", "Out_seq", "Max batchsize", "Non-first token time(ms)",
                 "Max non-first token time(ms)", "Probes"]  # fmt: skip
# why a backend cannot measure performance, in one line
REFUSED = {
    "hf": "transformers' generate neither builds prompts of an exact token length nor times each token of a "
          "batch; run performance on --backend engine",
}  # fmt: skip
DEFINITIONS = {
    "clock": "time.perf_counter() on the host; a token's time is when the engine step that made it returned, "
             "after the engine synchronized the device (engine/device.py now())",
    "submitted": "just before the batch's first request is handed to the engine (all at once)",
    "first token": "the first generated token (made by the prefill step); its time is TTFT",
    "total_time_s": "the batch's last token - submitted",
    "first_token_time_ms": "the batch's last first token - submitted (the whole batch's prefill)",
    "non_first_token_time_ms": "(total time - first token time) / (output tokens - 1): one decode step",
    "non_first_token_throughput": "batch size / non-first token time (s)",
    "e2e_throughput": "batch size x output tokens / total time (s)",
    "ttft_ms": "per request: first token - submitted",
    "tpot_ms": "per request: (last token - first token) / (output tokens - 1)",
    "itl_ms": "every gap between two consecutive tokens of a request",
    "e2e_latency_ms": "per request: last token - submitted",
}  # fmt: skip
# an endpoint's (--backend openai) clock: what this machine sees of the server, as vllm bench serve measures
ENDPOINT_DEFINITIONS = {
    "clock": "time.perf_counter() on this host (the client); a token's time is when the streamed chunk carrying it "
             "arrived (one logprob entry per token), so the network and the server's own queueing are in it",
    "submitted": "just before the batch's requests were sent, all at once (their images already encoded)",
    "input tokens": "as the endpoint counted them (usage.prompt_tokens), its chat template and image included",
}  # fmt: skip


def run_performance(model_cfg: ModelConfig | None, task_cfg: TaskConfig, opts, backend: Backend | None = None):
    """Run a performance or performance_maxbs task (runner.run hands them here). `backend` may be passed
    in ready-made (tests); otherwise it is built after every input check."""
    from ..parallel import RunLock, broadcast, init, layout
    from ..runner import ENDPOINT_FAMILY, RunResult, _check_writable, _device

    if task_cfg.task_name not in PERFORMANCE_TASKS:
        raise ModelTestError(f"task_type: {task_cfg.task_type} runs task_name: synthetic (prompts made to the exact "
                             f"input length), got task_name: {task_cfg.task_name}")  # fmt: skip
    if opts.predictions:
        raise ModelTestError("--predictions scores answers; a performance task measures a model: drop --predictions")
    if model_cfg is None:
        raise ModelTestError("a performance task needs --model_config_path")
    name = opts.backend or model_cfg.backend
    if name in REFUSED:
        raise ModelTestError(f"task_type: {task_cfg.task_type} is not available on the {name} backend: {REFUSED[name]}")
    if backend is None and not backend_class(name).times_tokens:  # (an unknown name is refused here too)
        raise ModelTestError(f"the {name} backend cannot time tokens")
    remote = backend_class(name).remote  # an endpoint: it runs the batches on its own device
    lay = layout(opts.tp, opts.dp, planned=opts.check_only)
    if remote and lay.world > 1:
        raise ModelTestError(f"an endpoint (--backend {name}) runs the model on its own devices: run the harness as "
                             "one process, without torchrun")  # fmt: skip
    if lay.dp > 1:
        raise ModelTestError(f"a performance run measures one copy of the model: --dp {lay.dp} would split the "
                             "batch; run one copy per device separately")  # fmt: skip
    sizes = task_cfg.batch_size or [opts.batch_size]  # the task's list, else --batch_size
    if any(b < 1 for b in sizes):
        raise ModelTestError(f"--batch_size must be >= 1, got {opts.batch_size}")
    if backend is None:
        if remote:  # the endpoint answers and serves the model (named in the paths) before anything is written
            backend_class(name).check(model_cfg, lay.tp)
        else:
            check_model_path(model_cfg)
            if opts.check_only:
                backend_class(name).check(model_cfg, lay.tp)
    maxbs = task_cfg.task_type == "performance_maxbs"
    if remote:
        device, family = None, ENDPOINT_FAMILY
        where = dict(output_dir=opts.output_dir, task_type=task_cfg.task_type, task=task_cfg.task_name,
                     served_model=model_cfg.served_model)  # fmt: skip
        make = endpoint_performance_paths
    else:
        device, family = _device(name, opts.device, backend, lay)
        where = dict(output_dir=opts.output_dir, family=family, task_type=task_cfg.task_type, task=task_cfg.task_name,
                     data_type=model_cfg.data_type, model=model_cfg.model_name, model_type=model_cfg.model_type,
                     tp=lay.tp)  # fmt: skip
        make = performance_paths
    files = ([make(**where, suffix=s) for s in ("round_result", "final_result")] if maxbs
             else [make(**where, batch_size=b) for b in sizes])  # fmt: skip
    for paths in files:
        _check_writable(paths, dry=opts.check_only)
    if opts.check_only:
        RunLock(files[0].debug_dir.parent).probe()
        print("modeltest: check passed; a performance run writes " + ", ".join(str(p.result_csv) for p in files),
              file=sys.stderr)  # fmt: skip
        return RunResult([], 0.0, 0, 0, files[0])

    if lay.main:
        for line in notices(model_cfg, task_cfg, name):
            print(f"modeltest: note: {line}", file=sys.stderr)
        if remote and opts.device:
            print(f"modeltest: note: --device does not apply on the {name} backend: the endpoint runs the model",
                  file=sys.stderr)  # fmt: skip
    init(lay)
    lock, created = None, None
    refused = None
    if lay.main:  # one run measures (and writes) at a time: another would share the device and the files
        try:
            lock = RunLock(files[0].debug_dir.parent).acquire()
        except ModelTestError as e:
            refused = str(e)
    refused = broadcast(refused, lay)
    if refused:
        raise ModelTestError(refused)
    started = time.time()
    try:
        if backend is None:
            backend = created = create_backend(name, model_cfg, device, lay.tp, max(sizes), opts.progress)
        if task_cfg.with_image:
            span = backend.image_span_tokens()
            short = [pair for pair in task_cfg.case_pair if pair[0] < span]
            if short:
                raise ModelTestError(f"case_pair: input length {short[0][0]} (of {short[0]}) is shorter than one image's "
                                     f"span of {span} tokens (with_image: true); make every input at least {span} "
                                     "tokens, or set with_image: false")  # fmt: skip
        run = _Measure(backend, task_cfg, model_cfg.model_name, lay)
        context = {"device": device, "family": family, "dtype": None if remote else model_cfg.data_type, "tp": lay.tp,
                   "backend": name, "device_name": None if remote else _device_name(device), "model": model_cfg,
                   "task": task_cfg, "started": started, "opts": opts,
                   "definitions": {**DEFINITIONS, **ENDPOINT_DEFINITIONS} if remote else DEFINITIONS,
                   "endpoint": {"base_url": model_cfg.base_url, "served_model": model_cfg.served_model} if remote
                   else None}  # fmt: skip
        if maxbs:
            result = _run_maxbs(run, files, context, lay.main)
        else:
            result = _run_sizes(run, files, sizes, context, lay.main)
    finally:
        if created is not None:
            created.close()
        if lock is not None:
            lock.release()
    return result


class _Measure:
    """Runs the cases on a backend: figures per (batch size, case), each round's seed distinct."""

    def __init__(self, backend: Backend, task_cfg: TaskConfig, model: str, lay=None):
        self.backend, self.cfg, self.model, self.lay = backend, task_cfg, model, lay
        self.batches = 0  # every batch run gets its own seed: no two share a prompt

    def case(self, batch_size: int, input_len: int, output_len: int) -> dict:
        """The case's figures (the seed's, averaged over the rounds, and the per-request statistics over
        every measured request), or {"error": ...}. Under tensor parallelism every rank runs the same
        batches in lockstep (the engine's ranks step together) and all take rank 0's figures, so what
        is decided from them (performance_maxbs's next probe) is decided the same everywhere."""
        from ..parallel import broadcast

        case = self._case(batch_size, input_len, output_len)
        return broadcast(case, self.lay) if self.lay is not None else case

    def _case(self, batch_size: int, input_len: int, output_len: int) -> dict:
        case = {"batch_size": batch_size, "input_len": input_len, "output_len": output_len}
        rounds: list[TimedBatch] = []
        try:
            for i in range(self.cfg.warmup_rounds + self.cfg.rounds):
                self.batches += 1
                got = self.backend.run_timed(input_len, output_len, batch_size, self.cfg.with_image, self.batches)
                if i >= self.cfg.warmup_rounds:
                    rounds.append(got)
        except SampleError as e:
            return {**case, "error": str(e)}
        bad = [(n, len(t)) for b in rounds for n, t in zip(b.input_tokens, b.token_times, strict=True)
               if n != input_len or len(t) != output_len]  # fmt: skip
        if bad:
            return {**case, "error": f"a request ran {bad[0][0]} input and {bad[0][1]} output tokens, not "
                                     f"{input_len} and {output_len}"}  # fmt: skip
        return {**case, **_figures(rounds, batch_size, output_len), "error": None}


def _figures(rounds: list[TimedBatch], batch_size: int, output_len: int) -> dict:
    """The seed's batch figures (mean over rounds) and vLLM's per-request statistics (over all rounds)."""
    totals = [max(t[-1] for t in b.token_times) - b.submitted for b in rounds]
    firsts = [max(t[0] for t in b.token_times) - b.submitted for b in rounds]
    total = sum(totals) / len(totals)
    first = sum(firsts) / len(firsts)
    non_first = (total - first) / (output_len - 1)
    times = [(b.submitted, t) for b in rounds for t in b.token_times]
    memory = [b.peak_memory_bytes for b in rounds if b.peak_memory_bytes is not None]
    return {
        "total_time_s": total,
        "first_token_time_ms": first * 1000,
        "non_first_token_time_ms": non_first * 1000,
        "non_first_token_throughput": batch_size / non_first if non_first > 0 else None,
        "e2e_throughput": batch_size * output_len / total,
        "ttft_ms": describe([t[0] - s for s, t in times]),
        "tpot_ms": describe([(t[-1] - t[0]) / (len(t) - 1) for _, t in times]),
        "itl_ms": describe([b - a for _, t in times for a, b in itertools.pairwise(t)]),
        "e2e_latency_ms": describe([t[-1] - s for s, t in times]),
        "input_tokens": [n for b in rounds for n in b.input_tokens],
        "output_tokens": [len(t) for b in rounds for t in b.token_times],
        "peak_device_memory_bytes": max(memory) if memory else None,
        "engine": [b.engine for b in rounds],
    }


def _row(model: str, case: dict) -> list:
    head = [model, case["batch_size"], case["input_len"], case["output_len"]]
    if case["error"] is not None:
        return head + [f"error: {case['error']}"] + [None] * 6
    return head + [round(case["total_time_s"], 6), round(case["first_token_time_ms"], 4),
                   round(case["non_first_token_time_ms"], 4), _r(case["non_first_token_throughput"]),
                   _r(case["e2e_throughput"]), None, None]  # fmt: skip


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _averages(cases: list[dict]) -> tuple[float | None, float | None]:
    """The seed's two averages: the mean non-first token and E2E throughput over the cases that ran."""
    ran = [c for c in cases if c["error"] is None and c["non_first_token_throughput"] is not None]
    if not ran:
        return None, None
    return (sum(c["non_first_token_throughput"] for c in ran) / len(ran),
            sum(c["e2e_throughput"] for c in ran) / len(ran))  # fmt: skip


def _fingerprint(task_cfg: TaskConfig, batch_size, ctx: dict) -> str:
    """What makes two performance runs comparable: the cases, the batch size, images or not, and the
    hardware class (device family, tp, dtype) - a history baseline is only taken from a run that matches."""
    key = {"cases": task_cfg.case_pair, "batch_size": batch_size, "with_image": task_cfg.with_image,
           "family": ctx["family"], "tp": ctx["tp"], "dtype": ctx["dtype"], "kind": task_cfg.task_type}  # fmt: skip
    if ctx["endpoint"] is not None:  # an endpoint's runs compare with the same endpoint's
        key["endpoint"] = ctx["endpoint"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _summary(ctx: dict, task: str, batch_size, cases: list[dict], paths: RunPaths, metric: str, value,
             complete: bool) -> dict:  # fmt: skip
    from ..runner import _git_commit, _versions

    task_cfg: TaskConfig = ctx["task"]
    errors = sum(1 for c in cases if c["error"] is not None)
    return {
        "kind": task_cfg.task_type,
        "task": task,
        "model": ctx["model"].model_name,
        "metric": metric,
        "value": value,
        "stderr": None,
        "complete": complete,
        "dataset_fingerprint": _fingerprint(task_cfg, batch_size, ctx),
        "total": len(cases),
        "errors": errors,
        "error_rate": errors / len(cases) if cases else 0.0,
        "cases": cases,
        "definitions": ctx["definitions"],
        "endpoint": ctx["endpoint"],
        "device": ctx["device"],
        "device_name": ctx["device_name"],
        "dtype": ctx["dtype"],
        "batch_size": batch_size,
        "tp": ctx["tp"],
        "dp": 1,
        "timings": {"wall_s": time.time() - ctx["started"]},
        "config": {"model": to_dict(ctx["model"]), "task": to_dict(task_cfg), "backend": ctx["backend"],
                   "device": ctx["family"]},  # fmt: skip
        "versions": _versions(),
        "git_commit": _git_commit(),
        ("finished_at" if complete else "updated_at"): datetime.now().isoformat(timespec="seconds"),
        "paths": {"csv": str(paths.result_csv)},
    }


def _run_sizes(run: _Measure, files: list[RunPaths], sizes: list[int], ctx: dict, main: bool):
    """task_type performance: every case at every batch size; each batch size's CSV and JSON are
    rewritten after each case, so a long run shows its progress (the JSON says complete: false)."""
    from ..runner import RunResult

    task_cfg: TaskConfig = ctx["task"]
    summaries, all_rows = [], []
    for batch_size, paths in zip(sizes, files, strict=True):
        cases: list[dict] = []
        for input_len, output_len in task_cfg.case_pair:
            cases.append(run.case(batch_size, input_len, output_len))
            if not main:
                continue
            rows = [_row(run.model, c) for c in cases]
            done = len(cases) == len(task_cfg.case_pair)
            average = _averages(cases)
            if done:
                rows[-1][-2:] = [_r(average[0]), _r(average[1])]
            write_csv(paths.result_csv, rows, COLUMNS)
            summary = _summary(ctx, f"{task_cfg.task_name}_batch{batch_size}", batch_size, cases, paths, HEADLINE,
                               average[1], done)  # fmt: skip
            summary["non_first_token_throughput_average"] = average[0]
            write_json(paths.result_json, summary)
            _say(cases[-1])
        if main:
            all_rows += rows
            summaries.append((summary, paths))
    if not main:
        return RunResult([], 0.0, 0, 0, files[0])
    return _finish(all_rows, summaries, ctx["opts"])


def _say(case: dict) -> None:
    what = f"batch {case['batch_size']}, {case['input_len']} in / {case['output_len']} out"
    if case["error"] is not None:
        print(f"modeltest: performance: {what}: failed: {case['error']}", file=sys.stderr)
        return
    crowded = [e["max_concurrent"] for e in case["engine"] if e.get("max_concurrent", case["batch_size"]) <
               case["batch_size"]]  # fmt: skip
    if crowded:
        print(f"modeltest: performance: {what}: the engine ran at most {min(crowded)} of the batch's requests at "
              "once (mm_model.infer_params.max_batch_size, or a KV cache too small): the figures are not the "
              "whole batch's", file=sys.stderr)  # fmt: skip
    print(f"modeltest: performance: {what}: first token {case['first_token_time_ms']:.2f} ms, non-first "
          f"{case['non_first_token_time_ms']:.2f} ms, {case['e2e_throughput']:.1f} tokens/s", file=sys.stderr)


def _finish(rows: list[list], summaries: list[tuple[dict, RunPaths]], opts):
    """The table, the history (--history: one run per batch size), the exit code (3 when more cases
    failed than --max_error_rate allows)."""
    from tabulate import tabulate

    from ..runner import RunResult

    print(tabulate([r[:9] for r in rows], headers=COLUMNS[:9], tablefmt="github"))
    for summary, paths in summaries:
        print(f"results: {paths.result_csv}")
        if not _record(opts, summary, paths):
            return RunResult(rows, 0.0, 0, 0, paths, 2, summary)
    total = sum(s["total"] for s, _ in summaries)
    errors = sum(s["errors"] for s, _ in summaries)
    code = EXIT_TOO_MANY_ERRORS if total and errors / total > opts.max_error_rate else 0
    if code:
        print(f"modeltest: {errors} of {total} cases failed (more than --max_error_rate {opts.max_error_rate})",
              file=sys.stderr)  # fmt: skip
    summary, paths = summaries[-1]
    return RunResult(rows, summary["value"] or 0.0, total, errors, paths, code, summary)


def _record(opts, summary: dict, paths: RunPaths) -> bool:
    """--history: the run recorded (one per batch size; maxbs: one); False when the history cannot be
    written (one line; the results stay)."""
    from .. import history

    if not opts.history:
        return True
    try:
        run_id = history.record_run(opts.history, summary, paths.result_json, opts.output_dir)
    except ModelTestError as e:
        print(f"modeltest: {e} (the run's results are written: {paths.result_json})", file=sys.stderr)
        return False
    print(f"history: run {run_id} in {opts.history}")
    return True


def _run_maxbs(run: _Measure, files: list[RunPaths], ctx: dict, main: bool):
    """task_type performance_maxbs: per case, bisection over [smallest, largest] for the largest batch size
    whose non-first token time is under the limit. A probe that fails (out of memory, ...) counts as over
    the limit. Each probe is a row of _round_result.csv as it finishes."""
    from ..runner import RunResult

    task_cfg: TaskConfig = ctx["task"]
    limit = task_cfg.max_non_first_token_time_ms
    lo, hi = task_cfg.batch_size
    round_paths, final_paths = files
    probes, finals, round_rows = [], [], []

    def probe(batch_size: int, input_len: int, output_len: int) -> bool:
        case = run.case(batch_size, input_len, output_len)
        case["under_limit"] = case["error"] is None and case["non_first_token_time_ms"] < limit
        probes.append(case)
        if main:
            round_rows.append(_row(run.model, case)[:9] + [limit, case["under_limit"]])
            write_csv(round_paths.result_csv, round_rows, ROUND_COLUMNS)
            _say(case)
        return case["under_limit"]

    for input_len, output_len in task_cfg.case_pair:
        first = len(probes)
        if not probe(lo, input_len, output_len):
            best = None
        elif probe(hi, input_len, output_len):
            best = hi
        else:
            best, over = lo, hi
            while over - best > 1:
                mid = (best + over) // 2
                if probe(mid, input_len, output_len):
                    best = mid
                else:
                    over = mid
        mine = probes[first:]
        chosen = next((c for c in mine if c["batch_size"] == best), None)
        finals.append({"input_len": input_len, "output_len": output_len, "max_batch_size": best,
                       "non_first_token_time_ms": chosen["non_first_token_time_ms"] if chosen else None,
                       "max_non_first_token_time_ms": limit, "probes": [c["batch_size"] for c in mine]})  # fmt: skip
    if not main:
        return RunResult([], 0.0, 0, 0, final_paths)
    rows = [[run.model, f["input_len"], f["output_len"], f["max_batch_size"], _r(f["non_first_token_time_ms"]),
             limit, " ".join(map(str, f["probes"]))] for f in finals]  # fmt: skip
    write_csv(final_paths.result_csv, rows, FINAL_COLUMNS)
    answers = [f["max_batch_size"] for f in finals]
    value = None if None in answers else min(answers)  # the history's figure: the tightest case's answer
    summary = _summary(ctx, f"{task_cfg.task_name}_maxbs", [lo, hi], probes, final_paths, "max_batch_size", value,
                       True)  # fmt: skip
    summary.update({"errors": 0, "error_rate": 0.0, "probes": summary.pop("cases"), "cases": finals,
                    "total": len(finals), "max_non_first_token_time_ms": limit})  # fmt: skip
    write_json(final_paths.result_json, summary)
    from tabulate import tabulate

    print(tabulate(rows, headers=FINAL_COLUMNS, tablefmt="github"))
    print(f"probes: {round_paths.result_csv}\nresults: {final_paths.result_csv}")
    code = 0 if _record(ctx["opts"], summary, final_paths) else 2
    return RunResult(rows, 0.0, len(finals), 0, final_paths, code, summary)


def _device_name(device: str) -> str:
    """The accelerator's model name (the processor's on CPU), so two runs' figures say what ran them."""
    import platform

    import torch

    kind = device.split(":")[0]
    try:
        if kind == "cuda":
            return torch.cuda.get_device_name(torch.device(device))
        if kind == "npu":
            return torch.npu.get_device_name(torch.device(device))
    except (RuntimeError, AttributeError):
        pass
    return platform.processor() or platform.machine()
