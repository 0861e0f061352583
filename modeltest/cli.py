"""`python -m modeltest` / `modeltest`: the seed's flags (--model_config_path, --task_config_path,
--batch_size, --tp, --output_dir, --save_debug_enable, ...) plus resume, score-only mode and limits."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .errors import EXIT_BAD_INPUT, EXIT_TOO_MANY_ERRORS, ModelTestError

# main() dispatches these on the first argument, before this parser sees it, so argparse cannot list
# them: the help says so itself.
EPILOG = """\
commands (each has its own --help):
  modeltest selftest    check that this install works end to end: a tiny random model on CPU, nothing
                        downloaded
  modeltest compare     is a candidate run as accurate (or as fast) as its baseline? (PASS/FAIL verdict)
  modeltest history     list, plot or report the runs recorded in a --history database

exit codes:
  0    done
  2    bad input or usage (an error line on stderr, no traceback)
  3    more samples failed than --max_error_rate allows (everything is still written)
  130  interrupted (rerun the same command to resume)
  under torchrun also 143 (stopped: another process failed) and 1 (a peer process is gone)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modeltest",
        usage="modeltest --task_config_path TASK (--model_config_path MODEL | --predictions FILE |\n"
        "                 --backend openai --base_url URL) [options]\n"
        "       modeltest {selftest,compare,history} ...",
        description="Evaluate a vision-language model on a task, or score predictions made elsewhere.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the epilog's lines
    )
    p.add_argument("--model_config_path", help="model YAML (configs/model/*.yaml); not needed with --predictions")
    p.add_argument("--task_config_path", required=True, help="task YAML (configs/task/*.yaml)")
    p.add_argument("--output_dir", default="output", help="where results/ and debug/ go (default: ./output)")
    p.add_argument("--model_path", help="override model_path from the model config")
    p.add_argument("--dataset_path", help="override local_dataset_path from the task config")
    p.add_argument("--image_list", help="coco_caption: a file of image names (one a line) to caption, "
                   "relative to the image folder")  # fmt: skip
    p.add_argument("--annotations_path", help="coco_caption: COCO caption annotations (captions_val2014.json) "
                   "to score with BLEU-4, METEOR, ROUGE-L and CIDEr")  # fmt: skip
    p.add_argument("--batch_size", type=int, help="requests per backend call (default 1); task_type performance: "
                   "the one batch size to measure, instead of the task config's batch_size list")  # fmt: skip
    p.add_argument("--limit", type=int, help="evaluate only N samples (textvqa: the first N; coco_caption: "
                   "N drawn at random with --seed)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the random draw of --limit samples, where a task draws (default 0)")
    p.add_argument("--backend", choices=["engine", "hf", "openai"], help="override the model config's backend "
                   "(openai: an OpenAI-compatible endpoint at --base_url runs the model; then no model config is "
                   "needed)")  # fmt: skip
    p.add_argument("--base_url", help="openai backend: the endpoint as the openai client takes it, e.g. "
                   "http://127.0.0.1:8000/v1 (python -m engine.serve, vLLM, a hosted API)")  # fmt: skip
    p.add_argument("--api_key", help="openai backend: the endpoint's API key (default: $OPENAI_API_KEY, which "
                   "keeps it out of the process list; never written to any output)")  # fmt: skip
    p.add_argument("--served_model", help="openai backend: the model name to request (default: the one model "
                   "the endpoint's GET /v1/models lists)")  # fmt: skip
    p.add_argument("--num_concurrent", type=int, help="openai backend: requests in flight at once (default 16)")
    p.add_argument("--timeout", type=float, help="openai backend: seconds one request attempt may take "
                   "(default 600)")  # fmt: skip
    p.add_argument("--max_retries", type=int, help="openai backend: retries of a connection error, timeout, "
                   "429 or 5xx, with backoff and the server's Retry-After (default 2)")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda[:i] or npu[:i] (default: npu, else cuda, else cpu)")
    p.add_argument("--tp", type=int, help="tensor-parallel size: processes that run one copy of the model. Above "
                   "1 only under torchrun (bash scripts/mm_run.sh starts it; tp x dp = its processes) and only with "
                   "the engine backend (hf: use --dp); tp must divide the model's attention heads, vocabulary and MLP "
                   "width. Default: WORLD_SIZE / --dp, all processes without --dp. See README, 'Several "
                   "processes'")  # fmt: skip
    p.add_argument("--dp", type=int, help="data-parallel size: copies of the model the samples are shared "
                   "among (default: WORLD_SIZE / --tp)")  # fmt: skip
    p.add_argument("--check_only", action="store_true", help="check the configs, dataset, model folder and "
                   "output folder, then exit (0: a run can start); loads and writes nothing")  # fmt: skip
    p.add_argument("--predictions", metavar="FILE", help="score-only mode: score answers made elsewhere, no "
                   "model loaded. TextVQA: JSONL, one {\"question_id\": .., \"answer\": ..} per line; the JSON list "
                   "of such records that Qwen-VL's evaluate_vqa.py writes; or a {question_id: answer} map. Captions "
                   "(coco_caption): the seed's {image file name: caption} (*_coco_rst.json) or its older "
                   "{\"image_file\": [...], \"model_answer\": [...]}")  # fmt: skip
    p.add_argument("--save_debug_enable", action="store_true", help="also write the seed's outputs_<time>.txt")
    p.add_argument("--history", default=os.environ.get("MODELTEST_HISTORY") or None,
                   help="record the finished run in this SQLite history (default: $MODELTEST_HISTORY)")  # fmt: skip
    p.add_argument("--no_retry_errors", action="store_true", help="keep the samples an earlier run in "
                   "--output_dir recorded as failed (by default a rerun does them again)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="discard samples from an earlier run in "
                   "output_dir (and replace coco_caption's <device>_coco_rst.json)")  # fmt: skip
    p.add_argument("--max_error_rate", type=float, default=0.0,
                   help="exit 3 when more than this fraction of samples failed (default 0)")  # fmt: skip
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--lcoc_disable", action="store_true", help=argparse.SUPPRESS)  # the seed's; no effect here
    return p


def run_cli(argv: list[str] | None = None) -> int:
    from .config import ModelConfig, load_model_config, load_task_config
    from .runner import RunOptions, run

    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ModelTestError(f"--limit must be >= 1, got {args.limit}")
    task_cfg = load_task_config(args.task_config_path)
    if args.dataset_path:
        task_cfg.local_dataset_path = args.dataset_path
    if args.image_list:
        task_cfg.image_list = args.image_list
    if args.annotations_path:
        task_cfg.annotations_path = args.annotations_path
    if args.batch_size is not None and task_cfg.task_type == "performance":
        task_cfg.batch_size = [args.batch_size]  # the flag overrides the YAML, as every flag does
    model_cfg = None
    if args.model_config_path:
        model_cfg = load_model_config(args.model_config_path)
        if args.model_path:
            model_cfg.model_path = args.model_path
    elif args.backend == "openai" and not args.predictions:  # the endpoint has the model: named after it
        model_cfg = ModelConfig(model_name="", backend="openai")
    elif not args.predictions:
        raise ModelTestError("--model_config_path is required (or --predictions to score answers made elsewhere, "
                             "or --backend openai --base_url URL to evaluate an endpoint)")  # fmt: skip
    if model_cfg is not None:
        _endpoint_flags(args, model_cfg)
    opts = RunOptions(
        output_dir=args.output_dir,
        backend=args.backend,
        device=args.device,
        batch_size=1 if args.batch_size is None else args.batch_size,
        tp=args.tp,
        dp=args.dp,
        check_only=args.check_only,
        retry_errors=not args.no_retry_errors,
        history=args.history,
        limit=args.limit,
        seed=args.seed,
        predictions=args.predictions,
        save_debug=args.save_debug_enable,
        overwrite=args.overwrite,
        max_error_rate=args.max_error_rate,
        progress=not args.no_progress,
    )
    result = run(model_cfg, task_cfg, opts)
    if result.exit_code == EXIT_TOO_MANY_ERRORS and not task_cfg.task_type.startswith("performance"):
        print(
            f"modeltest: {result.errors} of {result.total} samples failed (more than --max_error_rate "
            f"{opts.max_error_rate}); see {result.paths.samples}",
            file=sys.stderr,
        )
    return result.exit_code


def _endpoint_flags(args, model_cfg) -> None:
    """--base_url, --api_key, ... over the model config's keys of the same names (checked as those are)."""
    for name, low in (("num_concurrent", 1), ("max_retries", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ModelTestError(f"--{name} must be >= {low}, got {value}")
    if args.timeout is not None and not args.timeout > 0:
        raise ModelTestError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    for name in ("base_url", "api_key", "served_model", "num_concurrent", "timeout", "max_retries"):
        if getattr(args, name) is not None:
            setattr(model_cfg, name, getattr(args, name))


class _Stopped(BaseException):
    """SIGTERM: torchrun stops the other processes when one of them fails. A BaseException, like
    KeyboardInterrupt, so no per-sample error handling can take it for a failed sample."""


def _on_sigterm(signum, frame):
    raise _Stopped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    world = os.environ.get("WORLD_SIZE", "1")
    distributed = world.isdigit() and int(world) > 1
    where = f" (rank {os.environ.get('RANK', '0')})" if distributed else ""
    if distributed:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if argv[:1] == ["selftest"]:
            from .selftest import main as selftest

            return selftest(argv[1:])
        if argv[:1] == ["compare"]:
            from .compare import main as compare

            return compare(argv[1:])
        if argv[:1] == ["history"]:
            from .history import main as history

            return history(argv[1:])
        return run_cli(argv)
    except ModelTestError as e:
        print(f"modeltest: error{where}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"modeltest{where}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _Stopped:
        print(f"modeltest{where}: stopped by torchrun (another process failed: see its report); rerun the same "
              "command to resume", file=sys.stderr)  # fmt: skip
        return 143
    except BrokenPipeError:
        return EXIT_BAD_INPUT
    except OSError as e:  # the disk filled up, a folder became unwritable, ...: not a bug in the run
        print(f"modeltest: error{where}: {e}; what was written so far is kept: rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    except Exception as e:
        if distributed and _is_distributed_error(e):  # a peer is gone or a collective timed out
            print(f"modeltest{where}: {type(e).__name__}: {str(e).splitlines()[0][:300]}; another process has "
                  "probably failed (see torchrun's report); rerun the same command to resume", file=sys.stderr)  # fmt: skip
            return 1
        raise


def _is_distributed_error(e: Exception) -> bool:
    import torch.distributed as dist

    return isinstance(e, getattr(dist, "DistError", ())) or "gloo" in str(e) or "NCCL" in str(e)


if __name__ == "__main__":
    sys.exit(main())
