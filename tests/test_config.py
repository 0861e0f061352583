"""Protects config loading: the seed's YAML files load as written, and every bad key or value is
refused at load time with the file, line, key and what is allowed."""

import pytest

from modeltest.config import load_model_config, load_task_config
from modeltest.errors import ModelTestError

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs"

# The seed's qwen_vl.yaml, as its users have it (note `shm_name_save_path: None`, a string in YAML).
SEED_QWEN_VL = """\
model_name: qwen_vl
model_path: /data_mm/weights/Qwen-VL
model_type: pa
data_type: bf16
use_chat_template: False
max_position_embedding: -1
block_size: 128
requested_gpu_framework: "Huggingface"
trust_remote_code: False
mm_model:
  path: run_pa
  classname: PARunner
  prompt_prefix: ''
  prompt_suffix: ' Answers:'
  infer_params:
    max_output_length: 65
    is_chat_model: False
    shm_name_save_path: None
  warm_up_image_path: ['/data_mm/datasets/textvqa_val/train_images/003a8ae2ef43b901.jpg']
"""

SEED_TEXTVQA = """\
task_type: precision
task_name: textvqa
hf_dataset_path: google/textvqa
om_dataset_path: ""
local_dataset_path: /data_mm/datasets/textvqa_val/textvqa_val.jsonl
prompt: ""
shots: 0
requested_max_input_length: 20000
requested_max_output_length: 256
need_logits: False
metric:
  metric_type: acc
metadata:
  version: 1.0
subject_mapping:
  textvqa:
    name: textvqa
"""


def test_seed_configs_load_as_written(tmp_path):
    (tmp_path / "m.yaml").write_text(SEED_QWEN_VL)
    (tmp_path / "t.yaml").write_text(SEED_TEXTVQA)
    m = load_model_config(tmp_path / "m.yaml")
    assert m.model_name == "qwen_vl" and m.block_size == 128 and m.trust_remote_code is False
    assert m.mm_model.prompt_suffix == " Answers:" and m.mm_model.prompt_prefix == ""
    assert m.mm_model.infer_params.max_output_length == 65
    assert m.mm_model.infer_params.shm_name_save_path is None
    assert m.mm_model.warm_up_image_path == ["/data_mm/datasets/textvqa_val/train_images/003a8ae2ef43b901.jpg"]
    t = load_task_config(tmp_path / "t.yaml")
    assert t.metric.metric_type == "vqa_accuracy" and t.metric.normalizer == "evalai"
    assert t.metadata.version == "1.0" and t.requested_max_output_length == 256


def test_repo_configs_load():
    for path in (REPO_CONFIGS / "model").glob("*.yaml"):
        load_model_config(path)
    for path in (REPO_CONFIGS / "task").glob("*.yaml"):
        load_task_config(path)


def _err(tmp_path, text, loader=load_model_config):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ModelTestError) as e:
        loader(p)
    return str(e.value)


def test_unknown_key_names_file_line_and_closest(tmp_path):
    msg = _err(tmp_path, "model_name: x\nmodel_pth: /w\n")
    assert "bad.yaml:2" in msg and "model_pth" in msg and "did you mean 'model_path'" in msg
    msg = _err(tmp_path, "model_name: x\nmm_model:\n  infer_params:\n    max_output_lenght: 3\n")
    assert "bad.yaml:4" in msg and "mm_model.infer_params.max_output_lenght" in msg and "max_output_length" in msg


def test_wrong_types_and_values_name_key_value_and_allowed(tmp_path):
    msg = _err(tmp_path, "model_name: x\ndata_type: fp8\n")
    assert "data_type" in msg and "'fp8'" in msg and "'fp16', 'bf16', 'fp32'" in msg
    msg = _err(tmp_path, "model_name: x\nblock_size: big\n")
    assert "block_size" in msg and "expected an integer" in msg and "'big'" in msg
    msg = _err(tmp_path, "model_name: x\ntrust_remote_code: 'yes'\n")
    assert "trust_remote_code" in msg and "true or false" in msg
    msg = _err(tmp_path, "model_name: x\nblock_size: 0\n")
    assert "block_size must be a positive integer" in msg
    msg = _err(tmp_path, "task_name: textvqa\nmetric:\n  normalizer: offical\n", load_task_config)
    assert "metric.normalizer" in msg and "did you mean 'official'" in msg
    msg = _err(tmp_path, "model_path: /x\n")
    assert "missing required key(s): model_name" in msg
    msg = _err(tmp_path, "model_name: [unclosed\n")
    assert "not valid YAML" in msg
    with pytest.raises(ModelTestError, match="config file not found"):
        load_model_config(tmp_path / "nope.yaml")
