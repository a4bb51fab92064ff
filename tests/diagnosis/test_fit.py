"""What fits in a card: bisection over the estimate, the Plan page's table, and card capacities."""

from __future__ import annotations

import json

import pytest

from diagnosis.analytic import estimate_analytic
from diagnosis.fit import FitResult, fit_table, largest_fitting, standard_settings
from diagnosis.gpus import GPUS, UnknownGpuError, find_gpu, gpu_capacity_bytes
from trainer.config import RunConfig, apply_overrides, validate_config

GIB = 1024**3


def seven_b(**model) -> RunConfig:
    """Scenario 1: a 7B LoRA run at 4k tokens, eager attention, bf16 weights."""
    return validate_config(
        {
            "model": {"name": "llama-2-7b", "dtype": "bf16", "attn_implementation": "eager", **model},
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {"seq_len": 4096},
            "train": {"micro_batch_size": 1},
        }
    )


def estimate_at(cfg: RunConfig, knob: str, value: int):
    return estimate_analytic(validate_config(apply_overrides(cfg.to_dict(), [f"{knob}={value}"])))


@pytest.mark.parametrize("knob", ["data.seq_len", "train.micro_batch_size"])
def test_the_answer_fits_and_one_more_does_not(knob: str):
    cfg = seven_b(gradient_checkpointing=True, attn_implementation="sdpa")
    capacity = gpu_capacity_bytes("A100 40GB")
    result = largest_fitting(cfg, capacity, knob, upper=20_000 if knob == "train.micro_batch_size" else None)
    assert isinstance(result, FitResult) and result.value is not None
    assert estimate_at(cfg, knob, result.value).fits(capacity)
    if result.value < result.limit:
        assert not estimate_at(cfg, knob, result.value + 1).fits(capacity)
        assert f"{knob}={result.value + 1} would need" in result.reason
    assert result.estimate is not None and result.estimate.fits(capacity)


def test_scenario_one_dies_before_4096_tokens_on_an_a100():
    result = largest_fitting(seven_b(), gpu_capacity_bytes("A100 80GB"), "data.seq_len")
    assert result.value is not None and result.value < 4096


def test_sequence_length_stops_at_the_models_positions():
    result = largest_fitting(seven_b(gradient_checkpointing=True), 10_000 * GIB, "data.seq_len")
    assert result.value == result.limit == 4096
    assert "limit" in result.reason


def test_upper_bounds_the_search():
    result = largest_fitting(seven_b(gradient_checkpointing=True), 10_000 * GIB, "train.micro_batch_size", upper=48)
    assert result.value == 48


def test_nothing_fits_says_how_much_the_smallest_needs():
    result = largest_fitting(seven_b(), 4 * GIB, "data.seq_len")
    assert result.value is None
    assert result.reason.startswith("even data.seq_len=2 needs") and "over 4.00 GiB" in result.reason
    assert result.estimate is not None and not result.estimate.fits(4 * GIB)


def test_min_seq_len_follows_a_shorter_sequence():
    raw = apply_overrides(
        seven_b(gradient_checkpointing=True).to_dict(), ["data.vary_length=true", "data.min_seq_len=4000"]
    )
    result = largest_fitting(validate_config(raw), gpu_capacity_bytes("T4"), "data.seq_len")
    assert result.value is not None and result.value < 4000


def test_results_serialise_for_the_cli():
    result = largest_fitting(seven_b(gradient_checkpointing=True), 40 * GIB, "data.seq_len")
    data = json.loads(json.dumps(result.to_json()))
    assert data["value"] == result.value and data["estimate"]["fits"] is True
    row = fit_table(seven_b(), 40 * GIB, [("as is", [])])[0]
    assert json.loads(json.dumps(row.to_json()))["label"] == "as is"


def test_unknown_knob_is_refused():
    with pytest.raises(ValueError, match="allowed: data.seq_len, train.micro_batch_size"):
        largest_fitting(seven_b(), 80 * GIB, "lora.r")


def test_any_estimator_can_be_searched():
    calls = []

    def linear(cfg: RunConfig):
        calls.append(cfg.data.seq_len)
        return estimate_analytic(cfg, device="cpu")

    result = largest_fitting(seven_b(gradient_checkpointing=True), 30 * GIB, "data.seq_len", estimator=linear)
    assert result.value is not None and len(calls) < 20


def test_fit_table_adds_one_change_per_row():
    rows = fit_table(seven_b(), gpu_capacity_bytes("A100 80GB"))
    assert [row.label for row in rows] == [
        "as is",
        "+ gradient checkpointing",
        "+ sdpa attention",
        "+ loss in 1,024-token chunks",
        "+ LoRA r=16 on q_proj/k_proj/v_proj/o_proj",
        "+ bf16 weights",
    ]
    assert rows[1].overrides == ("model.gradient_checkpointing=true",)
    assert rows[2].overrides[:1] == rows[1].overrides
    lengths = [row.seq_len.value or 0 for row in rows]
    batches = [row.micro_batch_size.value or 0 for row in rows]
    assert lengths == sorted(lengths) and batches[2] > batches[1] > batches[0]


def test_across_several_gpus_sharding_is_a_rung_before_lora_unless_already_on():
    cfg = validate_config(
        {"model": {"name": "mistral-7b", "dtype": "bf16"}, "lora": None, "data": {"seq_len": 4096},
         "train": {"micro_batch_size": 1, "num_gpus": 8}}
    )  # fmt: skip
    rows = fit_table(cfg, gpu_capacity_bytes("A100 40GB"))
    labels = [row.label for row in rows]
    assert labels[4] == "+ FSDP full_shard across 8 GPUs" and labels[5].startswith("+ LoRA")
    unsharded, sharded = rows[3], rows[4]
    assert (sharded.seq_len.value or 0) > (unsharded.seq_len.value or 0)  # the weights and states ÷ 8 leave room
    zero3 = validate_config({**cfg.to_dict(), "deepspeed": {"zero_stage": 3}})
    assert not any("FSDP" in row.label for row in fit_table(zero3, gpu_capacity_bytes("A100 40GB")))


def test_fit_table_uses_the_family_s_projection_names():
    cfg = validate_config({"model": {"name": "gpt2-xl"}, "lora": None, "data": {"seq_len": 1024}})
    labels = [row.label for row in fit_table(cfg, gpu_capacity_bytes("T4"))]
    assert "+ LoRA r=16 on c_attn/c_proj" in labels


# --- cards -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("a100-80gb", "A100 80GB"),
        ("A100 80GB", "A100 80GB"),
        ("H100", "H100 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("rtx4090", "RTX 4090 24GB"),
        ("NVIDIA H100 80GB HBM3", "H100 80GB"),
        ("l4", "L4 24GB"),
        ("L40S", "L40S 48GB"),
        ("tesla t4", "T4 16GB"),
        ("h200", "H200 141GB"),
    ],
)
def test_cards_are_found_however_spelled(spelling: str, name: str):
    assert find_gpu(spelling).name == name


def test_an_ambiguous_or_unknown_card_lists_the_known_ones():
    with pytest.raises(UnknownGpuError, match="'a100' is ambiguous: A100 40GB, A100 80GB"):
        find_gpu("a100")
    with pytest.raises(UnknownGpuError, match=r"unknown GPU 'b200'; known: A100 40GB, .*RTX 5090 32GB"):
        find_gpu("b200")


def test_capacities_are_what_the_driver_reports():
    # A little under the marketing size: the 40 GB A100 reports 39.39 GiB, the 80 GB H100 79.11 GiB.
    assert gpu_capacity_bytes("A100 40GB") == round(39.39 * GIB)
    for gpu in GPUS:
        marketed = int(gpu.name.split()[-1].removesuffix("GB"))
        assert 0.9 * marketed * GIB < gpu.capacity_bytes < marketed * GIB


def test_the_fit_table_of_a_litgpt_run_offers_no_chunked_loss_litgpt_already_has():
    cfg = validate_config({"model": {"name": "llama-3-8b", "dtype": "bf16", "implementation": "litgpt"}})
    labels = [label for label, _ in standard_settings(cfg)]
    assert labels and not any("chunks" in label for label in labels)
    assert len(fit_table(cfg, 80 * 1024**3)) == len(labels)
