"""Model and task configs: YAML in (PyYAML's SafeLoader; UTF-8, at most 1 MiB, and measured with its
aliases expanded before anything is built), validated dataclasses out.

The keys are the seed's (MindIE-LLM modeltest `config/model/*.yaml`, `config/task/*.yaml`), so its
files load as written. Every check happens here, at load time: an unknown key names the file, the
line, the key and the closest valid key; a wrong type or value names the key, the value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ModelTestError, closest

# ---------------------------------------------------------------------------------------------
# Dataclasses (field metadata "doc" is shown in errors; Literal types list the allowed values)
# ---------------------------------------------------------------------------------------------


@dataclass
class InferParams:
    max_output_length: int | None = None
    min_output_length: int = 0
    max_input_length: int | None = None
    max_batch_size: int | None = None
    max_prefill_tokens: int | None = None
    is_chat_model: bool = False
    shm_name_save_path: str | None = None

    def __post_init__(self):
        _positive(self, "max_output_length", "max_input_length", "max_batch_size")
        if self.min_output_length < 0:
            raise ValueError("min_output_length must be >= 0")


@dataclass
class MMModelConfig:
    path: str | None = None
    classname: str | None = None
    prompt_prefix: str | None = None
    prompt_suffix: str | None = None
    infer_params: InferParams = field(default_factory=InferParams)
    warm_up_image_path: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    model_name: str
    model_path: str | None = None
    model_type: Literal["pa", "fa"] = "pa"
    data_type: Literal["fp16", "bf16", "fp32"] = "bf16"
    use_chat_template: bool = False
    max_position_embedding: int = -1
    block_size: int = 128
    requested_gpu_framework: str | None = None
    trust_remote_code: bool = False
    backend: Literal["engine", "hf", "openai"] = "engine"
    env: dict[str, str] = field(default_factory=dict)
    mm_model: MMModelConfig = field(default_factory=MMModelConfig)
    # backend: openai - an OpenAI-compatible endpoint runs the model (modeltest/backends/openai.py)
    base_url: str | None = None  # as the openai client takes it: http://127.0.0.1:8000/v1
    api_key: str | None = field(default=None, metadata={"secret": True})  # else $OPENAI_API_KEY; never written
    served_model: str | None = None  # None: the one model the endpoint's GET /models lists
    num_concurrent: int = 16  # requests in flight at once
    timeout: float = 600.0  # seconds per request attempt (the openai client's default)
    max_retries: int = 2  # retries of a transient failure: connection, timeout, 408/409/429/5xx (the client's)

    def __post_init__(self):
        _positive(self, "block_size", "num_concurrent")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries!r}")


@dataclass
class MetricConfig:
    # None: the task's own (textvqa: vqa_accuracy, coco_caption: non_empty); the task fills it in
    metric_type: Literal["vqa_accuracy", "exact_match", "non_empty", "acc"] | None = None
    normalizer: Literal["evalai", "vqaeval", "qwen_vl", "official"] = "evalai"

    def __post_init__(self):
        # The seed's textvqa.yaml says `metric_type: acc`: its soft VQA accuracy.
        if self.metric_type == "acc":
            self.metric_type = "vqa_accuracy"


@dataclass
class Metadata:
    version: str | None = None


@dataclass
class TaskConfig:
    task_name: str
    task_type: Literal["precision", "performance", "performance_maxbs"] = "precision"
    local_dataset_path: str | None = None
    image_list: str | None = None  # coco_caption: image names, one a line, relative to the image folder
    annotations_path: str | None = None  # coco_caption: captions_val2014.json-style references (scoring only)
    hf_dataset_path: str | None = None
    hf_dataset_split: str | None = None  # with hf_dataset_path; None: the validation split
    om_dataset_path: str | None = None
    prompt: str | None = None
    shots: int = 0
    requested_max_input_length: int | None = None
    requested_max_output_length: int | None = None
    need_logits: bool = False
    need_truncate_input: bool = False
    metric: MetricConfig = field(default_factory=MetricConfig)
    metadata: Metadata = field(default_factory=Metadata)
    subject_mapping: dict[str, dict[str, Any]] = field(default_factory=dict)
    # task_type performance / performance_maxbs (modeltest/tasks/performance.py), the seed's keys:
    case_pair: list[list[int]] = field(default_factory=list)  # [[input tokens, output tokens], ...]
    batch_size: list[int] = field(default_factory=list)  # performance: each; maxbs: [smallest, largest]
    with_image: bool = True  # each request carries one 448x448 image (its span counted in the input)
    warmup_rounds: int = 1  # unmeasured runs of each case first
    rounds: int = 1  # measured runs of each case, averaged
    max_non_first_token_time_ms: float | None = None  # performance_maxbs: the limit a batch size must stay under

    def __post_init__(self):
        _positive(self, "requested_max_input_length", "requested_max_output_length")
        if self.shots != 0:
            raise ValueError("only zero-shot evaluation is supported (shots: 0)")
        if self.task_type != "precision":
            _check_performance(self)


PERFORMANCE_TYPES = ("performance", "performance_maxbs")


def _check_performance(cfg: TaskConfig) -> None:
    """The performance keys of a performance task: every case a pair of positive token counts with
    at least 2 output tokens (the non-first token figures need one), batch sizes positive, and for
    performance_maxbs a [smallest, largest] range and a positive limit."""
    if not cfg.case_pair:
        raise ValueError(f"task_type: {cfg.task_type} needs case_pair: a list of [input tokens, output tokens], "
                         "e.g. [[256, 256], [1024, 1024]]")  # fmt: skip
    for pair in cfg.case_pair:
        if len(pair) != 2 or pair[0] < 1 or pair[1] < 2:
            raise ValueError(f"case_pair: {pair!r} is not [input tokens >= 1, output tokens >= 2] (the non-first "
                             "token figures need at least 2 output tokens)")  # fmt: skip
    if len({tuple(p) for p in cfg.case_pair}) != len(cfg.case_pair):
        raise ValueError(f"case_pair: {cfg.case_pair!r} lists a case twice")
    if any(b < 1 for b in cfg.batch_size):
        raise ValueError(f"batch_size: {cfg.batch_size!r}: every batch size must be a positive integer")
    if len(set(cfg.batch_size)) != len(cfg.batch_size):
        raise ValueError(f"batch_size: {cfg.batch_size!r} lists a batch size twice")
    if cfg.warmup_rounds < 0:
        raise ValueError(f"warmup_rounds must be >= 0, got {cfg.warmup_rounds!r}")
    _positive(cfg, "rounds")
    if cfg.task_type == "performance_maxbs":
        if len(cfg.batch_size) != 2 or cfg.batch_size[0] >= cfg.batch_size[1]:
            raise ValueError(f"batch_size: {cfg.batch_size!r}: performance_maxbs searches a range, [smallest, "
                             "largest] with smallest < largest, e.g. [1, 256]")  # fmt: skip
        if cfg.max_non_first_token_time_ms is None or not cfg.max_non_first_token_time_ms > 0:
            raise ValueError("performance_maxbs needs max_non_first_token_time_ms: the positive limit (ms) the "
                             "non-first token time of a batch size must stay under")  # fmt: skip


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


# A config is a few KB. Anything near these limits is the wrong file or an attack ("billion laughs":
# a few hundred bytes of nested aliases that expand to hundreds of MB when built or walked).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


def read_text(path: str | Path, what: str = "file", max_bytes: int | None = None) -> str:
    """The whole of a UTF-8 text file (a leading byte-order mark is dropped). Every way it can fail is one
    ModelTestError naming the file (and for bad bytes the line), never a UnicodeDecodeError or OSError:
    the one reader the configs, datasets, predictions and caption files all go through."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ModelTestError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ModelTestError(f"{path}: is a folder; expected a {what}") from None
    except OSError as e:
        raise ModelTestError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ModelTestError(f"{path}: larger than {max_bytes} bytes, far more than a {what} holds; "
                             "is it the right file?")  # fmt: skip
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ModelTestError(f"{path}:{line}: not UTF-8 text{hint}: byte 0x{data[e.start]:02x} at offset "
                             f"{e.start}; save the {what} as UTF-8") from None  # fmt: skip
    return text[1:] if text.startswith("\ufeff") else text


def load_yaml(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    """Parse a YAML mapping safely; also return {key path: line number} for error messages."""
    path = Path(path)
    if not path.is_file():
        raise ModelTestError(f"config file not found: {path}")
    text = read_text(path, "config file", MAX_CONFIG_BYTES)
    loader = yaml.SafeLoader(text)
    try:
        # Compose first (aliases stay shared nodes, nothing is expanded), measure, then build.
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, path)
        data = loader.construct_document(node) if node is not None else None
        lines = _key_lines(node)
    except yaml.YAMLError as e:
        raise ModelTestError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:  # PyYAML composes and builds recursively
        raise ModelTestError(f"{path}: nested too deeply to be a config") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ModelTestError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data, lines


def _check_expansion(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose nodes, counted with every alias expanded, exceed MAX_CONFIG_NODES, or
    whose aliases form a cycle. Each distinct node is sized once (memoized), so a billion laughs is
    measured in microseconds without being built."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ModelTestError(f"{path}:{node.start_mark.line + 1}: an alias refers to a node that contains "
                                 "it (a recursive structure); a config cannot be recursive")  # fmt: skip
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_CONFIG_NODES:
                raise ModelTestError(f"{path}: expands to more than {MAX_CONFIG_NODES} values once its aliases "
                                     "(*name) are resolved; a config holds a few hundred - "
                                     "remove the nested aliases")  # fmt: skip
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def _key_lines(node, prefix: tuple = ()) -> dict[tuple, int]:
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + (key_node.value,)
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key))
    return out


def load_model_config(path: str | Path) -> ModelConfig:
    data, lines = load_yaml(path)
    return from_dict(ModelConfig, data, _Where(str(path), lines))


def load_task_config(path: str | Path) -> TaskConfig:
    data, lines = load_yaml(path)
    return from_dict(TaskConfig, data, _Where(str(path), lines))


@dataclass
class _Where:
    file: str
    lines: dict[tuple, int]
    keys: tuple = ()

    def child(self, key) -> _Where:
        return _Where(self.file, self.lines, self.keys + (key,))

    def __str__(self) -> str:
        line = self.lines.get(self.keys)
        loc = f"{self.file}:{line}" if line else self.file
        return f"{loc}: key '{'.'.join(map(str, self.keys))}'" if self.keys else loc


def from_dict(cls, data: Any, where: _Where | str = "<config>"):
    """Build dataclass `cls` from a mapping, checking keys, types and values."""
    if isinstance(where, str):
        where = _Where(where, {})
    if not isinstance(data, dict):
        raise ModelTestError(f"{where}: expected a mapping of keys, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            hint = closest(key, fields)
            sub = where.child(key)
            msg = f"{sub}: unknown key"
            msg += f"; did you mean '{hint}'?" if hint else f"; valid keys: {', '.join(fields)}"
            raise ModelTestError(msg)
        kwargs[key] = _convert(hints[key], value, where.child(key))
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ModelTestError(f"{where}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ModelTestError(f"{where}: {e}") from None


def _convert(tp, value, where: _Where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        # The seed's YAML writes `shm_name_save_path: None`, which YAML reads as the string "None".
        if value is None or value == "None":
            return None
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            hint = closest(value, [str(a) for a in args])
            extra = f" (did you mean {hint!r}?)" if hint else ""
            raise ModelTestError(f"{where}: {_show(value)} is not allowed{extra}; allowed: {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if isinstance(value, str):  # a single path where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ModelTestError(f"{where}: expected a list, got {_show(value)}")
        return [_convert(args[0], v, where.child(i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ModelTestError(f"{where}: expected a mapping, got {_show(value)}")
        return {str(k): _convert(args[1], v, where.child(k)) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ModelTestError(f"{where}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelTestError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelTestError(f"{where}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        # Numbers are fine where text is expected (metadata.version: 1.0, env values: 1).
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ModelTestError(f"{where}: expected text, got {_show(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module, not user input


def _show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def to_dict(cfg) -> dict:
    """The config as plain data, for run_config.json and the results JSON: secret fields (api_key) left out,
    so no file a run writes holds them."""
    out = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("secret"):
            out.pop(f.name)
    return out


# How the openai backend sends its requests, not what they ask: a resumed run may change them.
TRANSPORT_KEYS = ("num_concurrent", "timeout", "max_retries")


# ---------------------------------------------------------------------------------------------
# Keys accepted and not acted on: never silently (a one-line notice each, when set)
# ---------------------------------------------------------------------------------------------

# The seed's keys this tool has no use for, accepted so its files load as written. Every other field
# is read somewhere (tests/test_config_keys.py checks that each field is read or listed here).
IGNORED_KEYS = {
    "requested_gpu_framework": "the seed's framework name; the backend is chosen by `backend` (engine|hf|openai)",
    "mm_model.path": "the seed's runner module; the backend is chosen by `backend` (engine|hf|openai)",
    "mm_model.classname": "the seed's runner class; the backend is chosen by `backend` (engine|hf|openai)",
    "mm_model.infer_params.shm_name_save_path": "the seed's shared-memory hand-off; no process here uses one",
    "om_dataset_path": "the seed's OM-format dataset; use local_dataset_path or hf_dataset_path",
}
# Keys that only describe the run: kept with its configuration in the results JSON, which is their use.
RECORDED_ONLY = {"metadata.version": "the task's version"}
# Keys only some backends act on: key -> (the default that counts as unset, {backend that ignores it: why}).
ENGINE_ONLY = "the engine backend's setting"
SERVER_SIDE = "the endpoint runs the model: set it on its server (python -m engine.serve's flags)"
OPENAI_ONLY = "the openai backend's setting"
_ALL_BUT_OPENAI = {"engine": OPENAI_ONLY, "hf": OPENAI_ONLY}
BACKEND_KEYS = {
    "model_path": (None, {"openai": "the endpoint serves the model: base_url and served_model name it"}),
    "data_type": ("bf16", {"openai": SERVER_SIDE}),
    "block_size": (128, {"hf": ENGINE_ONLY + " (paged KV cache block)", "openai": SERVER_SIDE}),
    "max_position_embedding": (-1, {"hf": ENGINE_ONLY + " (caps its max_model_len)", "openai": SERVER_SIDE}),
    "mm_model.warm_up_image_path": ([], {"hf": ENGINE_ONLY + " (its warm-up step)", "openai": SERVER_SIDE}),
    "mm_model.infer_params.max_input_length": (None, {"hf": ENGINE_ONLY + " (its max_model_len)",
                                                      "openai": SERVER_SIDE}),
    "mm_model.infer_params.max_batch_size": (None, {"hf": ENGINE_ONLY + "; hf batches --batch_size requests",
                                                    "openai": "the endpoint batches what it receives; "
                                                              "num_concurrent sets the requests in flight"}),
    "mm_model.infer_params.max_prefill_tokens": (None, {"hf": ENGINE_ONLY + " (its prefill budget)",
                                                        "openai": SERVER_SIDE}),
    "trust_remote_code": (False, {"engine": "the engine never runs code from a model folder", "openai": SERVER_SIDE}),
    "use_chat_template": (False, {"openai": "the endpoint renders each chat request with its own chat template"}),
    "mm_model.infer_params.is_chat_model": (False, {"openai": "the endpoint renders each chat request with its "
                                                              "own chat template"}),
    "model_type": ("pa", {"openai": "the endpoint's result files are named <task>_result.*"}),
    "base_url": (None, _ALL_BUT_OPENAI),
    "api_key": (None, _ALL_BUT_OPENAI),
    "served_model": (None, _ALL_BUT_OPENAI),
    "num_concurrent": (16, _ALL_BUT_OPENAI),
    "timeout": (600.0, _ALL_BUT_OPENAI),
    "max_retries": (2, _ALL_BUT_OPENAI),
}


def _get(cfg, dotted: str):
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def notices(model: ModelConfig | None, task: TaskConfig, backend: str) -> list[str]:
    """One line for each key set in the configs that this run does not act on."""
    out = []
    for key, why in IGNORED_KEYS.items():
        cfg = task if key == "om_dataset_path" else model
        value = _get(cfg, key) if cfg is not None else None
        if value not in (None, "", [], {}):
            out.append(f"{key}: {value!r} is accepted for the seed's files and ignored: {why}")
    perf = [k for k in ("case_pair", "batch_size", "max_non_first_token_time_ms") if getattr(task, k)]
    if task.task_type == "precision" and perf:
        out.append(f"{', '.join(perf)}: performance keys, ignored by task_type: precision (the run's batch size is "
                   "--batch_size)")  # fmt: skip
    accuracy = [k for k in ("local_dataset_path", "hf_dataset_path", "image_list", "annotations_path", "prompt",
                             "requested_max_input_length", "requested_max_output_length") if getattr(task, k)]
    if task.task_type != "precision" and (accuracy or task.need_logits or task.need_truncate_input):
        named = ", ".join(accuracy + [k for k in ("need_logits", "need_truncate_input") if getattr(task, k)])
        out.append(f"{named}: accuracy keys, ignored by task_type: {task.task_type} (its prompts are made to "
                   "case_pair's lengths)")  # fmt: skip
    if task.task_type == "performance" and task.max_non_first_token_time_ms is not None:
        out.append("max_non_first_token_time_ms is performance_maxbs's limit; task_type: performance ignores it")
    if task.task_name == "coco_caption" and (task.hf_dataset_path or task.hf_dataset_split):
        out.append("hf_dataset_path / hf_dataset_split: coco_caption reads a local image folder "
                   "(local_dataset_path or --dataset_path); the hub source is TextVQA's")  # fmt: skip
    if model is not None:
        for key, (default, ignoring) in BACKEND_KEYS.items():
            value = _get(model, key)
            if backend in ignoring and value != default:
                shown = "'***'" if key == "api_key" else repr(value)  # a notice is a log line: no secret in it
                out.append(f"{key}: {shown} is ignored on the {backend} backend: {ignoring[backend]}")
        mm = model.mm_model
        if task.task_name == "coco_caption" and (mm.prompt_prefix or mm.prompt_suffix):
            out.append("mm_model.prompt_prefix / prompt_suffix (VQA cues) do not apply to captions: the caption "
                       "prompt is the task's own (prompt in the task config)")  # fmt: skip
        if model.model_type == "fa" and backend != "openai":
            out.append("model_type: 'fa' names the output files only: the engine always runs paged attention")
        if backend == "hf" and not (model.use_chat_template or model.mm_model.infer_params.is_chat_model):
            out.append("use_chat_template: false does not apply on the hf backend: it renders every prompt with "
                       "the processor's chat template, the only generic way to place images")  # fmt: skip
        if backend == "openai" and (task.requested_max_input_length is not None or task.need_truncate_input):
            out.append("requested_max_input_length / need_truncate_input do not apply on the openai backend: without "
                       "the model's tokenizer a prompt cannot be measured or cut here; the endpoint refuses a prompt "
                       "longer than its context (that sample's error)")  # fmt: skip
    elif task.requested_max_input_length is not None or task.need_truncate_input:
        out.append("requested_max_input_length / need_truncate_input do not apply in score-only mode: the "
                   "prompts were made elsewhere")  # fmt: skip
    return out

