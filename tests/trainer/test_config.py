from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, RunConfig, apply_overrides, load_config, runner_issues, validate_config

ISSUE_EXAMPLE = """
model:   {name: tiny-llama, dtype: fp32, attn_implementation: sdpa, gradient_checkpointing: false}
lora:    {r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}
data:    {source: synthetic, seq_len: 256, vary_length: false}
train:   {micro_batch_size: 2, grad_accum_steps: 1, max_steps: 20, lr: 1.0e-4,
          optimizer: adamw, mixed_precision: "no", device: auto, seed: 0}
memory:  {limit_gb: null, alloc_conf: null}
monitor: {nvml_interval_s: 1.0}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_issue_example_validates(tmp_path):
    cfg = load_config(write(tmp_path, ISSUE_EXAMPLE))
    assert cfg.model.name == "tiny-llama"
    assert cfg.lora is not None and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps == 20 and cfg.memory.limit_gb is None


def test_null_lora_means_full_fine_tuning():
    assert validate_config({"lora": None}).lora is None


def test_overrides_are_yaml_typed_and_dotted(tmp_path):
    cfg = load_config(
        write(tmp_path, ISSUE_EXAMPLE),
        ["train.max_steps=3", "lora.target_modules=[q_proj,k_proj]", "memory.limit_gb=1.5", "lora=null"],
    )
    assert cfg.train.max_steps == 3
    assert cfg.memory.limit_gb == 1.5
    assert cfg.lora is None


def test_override_creates_sections():
    assert apply_overrides({}, ["model.gradient_checkpointing=true"]) == {"model": {"gradient_checkpointing": True}}


def test_every_error_is_reported_with_its_key(tmp_path):
    bad = yaml.safe_load(ISSUE_EXAMPLE)
    bad["model"]["dtype"] = "fp8"
    bad["train"]["micro_batch_size"] = 0
    bad["train"]["optimizer"] = "lion"
    bad["monitor"]["colour"] = "red"
    with pytest.raises(ConfigError) as caught:
        validate_config(bad)
    keys = {issue.key for issue in caught.value.issues}
    assert keys == {"model.dtype", "train.micro_batch_size", "train.optimizer", "monitor.colour"}
    text = str(caught.value)
    assert "4 problem(s)" in text and "'fp32', 'bf16' or 'fp16'" in text and "unknown key" in text


def test_cross_field_errors_are_collected_together(tmp_path):
    with pytest.raises(ConfigError) as caught:
        validate_config(
            {
                "model": {"name": "tiny-gpt2"},
                "lora": {"target_modules": ["q_proj"]},
                "data": {"source": str(tmp_path / "missing.jsonl"), "seq_len": 4096},
                "train": {"device": "tpu"},
            }
        )
    keys = [issue.key for issue in caught.value.issues]
    assert sorted(keys) == ["data.seq_len", "data.source", "lora.target_modules", "train.device"]
    assert "c_attn" in str(caught.value)  # names what would be allowed


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tiny-lama", "neither a preset"),
        ("./nowhere/model", "neither a preset"),
    ],
)
def test_model_name_typos_are_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"model": {"name": name}})


def test_model_directory_needs_config_json(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        validate_config({"model": {"name": str(tmp_path)}})
    (tmp_path / "config.json").write_text("{}")
    assert validate_config({"model": {"name": str(tmp_path)}, "lora": None}).model.name == str(tmp_path)


def test_hub_id_is_accepted_on_paper():
    assert validate_config({"model": {"name": "Qwen/Qwen2.5-0.5B"}}).model.name == "Qwen/Qwen2.5-0.5B"


def test_data_file_kinds(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ConfigError, match=r"\.txt or \.jsonl"):
        validate_config({"data": {"source": str(tmp_path / "a.csv")}})
    (tmp_path / "a.txt").write_text("hello")
    assert validate_config({"data": {"source": str(tmp_path / "a.txt")}}).data.source.endswith("a.txt")


def test_fp16_autocast_needs_fp32_weights():
    with pytest.raises(ConfigError, match="fp16 autocast needs fp32 weights"):
        validate_config({"model": {"dtype": "bf16"}, "train": {"mixed_precision": "fp16"}})


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_round_trip():
    cfg = validate_config({"lora": {"r": 4}})
    assert RunConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, trainer.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_estimate_keys_validate_and_round_trip():
    cfg = validate_config(
        {
            "model": {"name": "tiny-llama", "dtype": "bf16", "quantization": "nf4"},
            "train": {"optimizer": "paged_adamw_8bit", "num_gpus": 8},
            "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
        }
    )
    assert cfg.model.quantization == "nf4" and cfg.train.num_gpus == 8 and cfg.deepspeed.zero_stage == 3
    assert validate_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert RunConfig().deepspeed is None and RunConfig().model.quantization == "none"


def test_fsdp_is_an_estimate_key_that_excludes_zero_and_the_runner_refuses():
    cfg = validate_config({"train": {"num_gpus": 4}, "fsdp": {"sharding_strategy": "shard_grad_op"}})
    assert cfg.fsdp.sharding_strategy == "shard_grad_op" and cfg.fsdp.offload_params is False
    assert validate_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert RunConfig().fsdp is None
    assert "fsdp" in [issue.key for issue in runner_issues(cfg)]
    with pytest.raises(ConfigError) as caught:
        validate_config(
            {
                "deepspeed": {"zero_stage": 3},
                "fsdp": {"sharding_strategy": "no_shard", "offload_params": True},
            }
        )
    keys = sorted(issue.key for issue in caught.value.issues)
    assert keys == ["fsdp", "fsdp.offload_params"]
    with pytest.raises(ConfigError, match="fsdp.sharding_strategy"):
        validate_config({"fsdp": {"sharding_strategy": "hybrid"}})


def test_prepare_for_kbit_training_is_on_by_default_and_can_be_turned_off():
    # On: the runner calls peft.prepare_model_for_kbit_training on a quantised base, as TRL and the QLoRA
    # examples do; off restates training code that does not (litgpt, sharded QLoRA).
    assert RunConfig().model.prepare_for_kbit_training is True
    cfg = validate_config({"model": {"quantization": "nf4", "prepare_for_kbit_training": False}})
    assert cfg.model.prepare_for_kbit_training is False
    assert validate_config(yaml.safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(ConfigError, match="model.prepare_for_kbit_training"):
        validate_config({"model": {"prepare_for_kbit_training": "sometimes"}})


def test_estimate_key_cross_checks_name_their_keys():
    with pytest.raises(ConfigError) as caught:
        validate_config(
            {
                "model": {"quantization": "int8"},
                "lora": None,
                "deepspeed": {"zero_stage": 1, "offload_params": "cpu"},
                "train": {"optimizer": "lamb", "num_gpus": 0},
            }
        )
    keys = sorted(issue.key for issue in caught.value.issues)
    assert keys == ["deepspeed.offload_params", "model.quantization", "train.num_gpus", "train.optimizer"]
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer: needs deepspeed.zero_stage"):
        validate_config({"deepspeed": {"offload_optimizer": "cpu"}})


def test_runner_refuses_what_it_cannot_train_but_estimates_accept():
    cfg = validate_config(
        {
            "model": {"quantization": "nf4", "attn_implementation": "flash_attention_2"},
            "train": {"device": "cpu", "optimizer": "adamw_8bit", "num_gpus": 2},
            "deepspeed": {"zero_stage": 2},
        }
    )
    issues = {issue.key: issue.message for issue in runner_issues(cfg)}
    assert set(issues) == {
        "model.quantization",
        "model.attn_implementation",
        "train.optimizer",
        "train.num_gpus",
        "deepspeed",
    }
    assert "CUDA only" in issues["model.quantization"] and "for estimates" in issues["train.num_gpus"]
    assert runner_issues(validate_config({"train": {"optimizer": "adafactor"}})) == []


def test_model_name_may_be_a_config_json_file(tmp_path):
    config = tmp_path / "my-config.json"
    config.write_text('{"model_type": "llama"}')
    assert validate_config({"model": {"name": str(config)}, "lora": None}).model.name == str(config)
    other = tmp_path / "weights.bin"
    other.write_text("x")
    with pytest.raises(ConfigError, match="not a config.json"):
        validate_config({"model": {"name": str(other)}})
