"""The analytic estimator's litgpt walk (model.implementation: litgpt) against what litgpt's own GPT
and LoRA keep for backward, recorded on the CPU by bench/record_litgpt_saved.py (litgpt is not a
dependency: the recording is the fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diagnosis.analytic import NF4_BYTES_PER_PARAM, NF4_NO_DQ_BYTES_PER_PARAM, estimate_analytic
from diagnosis.architecture import shape_for
from diagnosis.traced import TracedEstimateUnsupported, estimate_traced
from trainer.config import ConfigError, runner_issues, validate_config

RECORDED = json.loads((Path(__file__).parents[1] / "fixtures" / "litgpt" / "saved_bytes.json").read_text())
# The walk agrees within 0.5% today; 2% leaves room for a small tensor a release adds.
TOLERANCE = 0.02


def _hf_config(row: dict) -> dict:
    common = dict(
        vocab_size=row["vocab_size"],
        hidden_size=row["n_embd"],
        intermediate_size=row["intermediate_size"],
        num_hidden_layers=row["n_layer"],
        num_attention_heads=row["n_head"],
        tie_word_embeddings=False,
    )
    if row["family"] == "llama":
        return dict(common, model_type="llama", num_key_value_heads=row["n_query_groups"], max_position_embeddings=4096)
    if row["family"] == "gemma":
        return dict(
            common,
            model_type="gemma",
            num_key_value_heads=row["n_query_groups"],
            head_dim=row["head_size"],
            hidden_act="gelu_pytorch_tanh",
            max_position_embeddings=8192,
        )
    return dict(
        common,
        model_type="phi",
        partial_rotary_factor=row["rotary_percentage"],
        hidden_act="gelu_new",
        max_position_embeddings=2048,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )


def _config(tmp_path: Path, row: dict, implementation: str):
    folder = tmp_path / f"{row['litgpt_name']}-{row['targets']}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_hf_config(row)))
    return validate_config(
        dict(
            model=dict(name=str(folder), dtype="bf16", implementation=implementation),
            lora=None
            if row["hf_target_modules"] is None
            else dict(r=row["lora_r"], alpha=16, dropout=0.05, target_modules=row["hf_target_modules"]),
            data=dict(seq_len=row["seq_len"]),
            train=dict(micro_batch_size=row["batch"], device="cpu"),
        )
    )


@pytest.mark.parametrize("row", RECORDED["rows"], ids=lambda row: f"{row['litgpt_name']}-{row['targets']}")
def test_the_litgpt_walk_keeps_what_litgpt_keeps(tmp_path: Path, row: dict):
    litgpt = estimate_analytic(_config(tmp_path, row, "litgpt"), device="cpu").totals["saved_for_backward"]
    assert litgpt == pytest.approx(row["saved_bytes"], rel=TOLERANCE)
    # Under LoRA the transformers walk of the same config is far off (peft's fp32 adapters and one
    # dropout per module, the fp32 logits): the difference is the implementation's.
    if row["hf_target_modules"] is not None:
        transformers = estimate_analytic(_config(tmp_path, row, "transformers"), device="cpu")
        assert transformers.totals["saved_for_backward"] > row["saved_bytes"] * 1.1


def test_litgpt_quantises_lm_head_and_keeps_its_own_head_weight():
    shape = shape_for("gemma-2b")  # tied in transformers, two tensors in litgpt
    model = dict(name="gemma-2b", dtype="bf16", quantization="nf4", prepare_for_kbit_training=False)
    layers = shape.num_layers * sum(linear.d_in * linear.d_out for linear in shape.linear_layers())
    head = shape.vocab_size * shape.hidden_size
    hf = {t.name: t.bytes for t in estimate_analytic(validate_config(dict(model=model))).terms}
    lit = {
        t.name: t.bytes
        for t in estimate_analytic(
            validate_config(dict(model=dict(model, implementation="litgpt", double_quantization=False)))
        ).terms
    }
    assert hf["parameters, quantised linears (nf4)"] == pytest.approx(layers * NF4_BYTES_PER_PARAM, rel=1e-3)
    assert lit["parameters, quantised linears (nf4)"] == pytest.approx(
        (layers + head) * NF4_NO_DQ_BYTES_PER_PARAM, rel=1e-3
    )
    # The embedding stays bf16 in both; litgpt's head is a second, quantised copy rather than the same tensor.
    assert lit["parameters, embeddings/norms/head (bf16)"] == pytest.approx(
        hf["parameters, embeddings/norms/head (bf16)"], rel=1e-3
    )
    assert lit["lm_head dequantised for a chunk"] == head * 4
    # A user planning a litgpt QLoRA run is told how far such estimates fell short of litgpt's own runs.
    cfg = validate_config(dict(model=dict(model, implementation="litgpt")))
    assert any("13-16% below the peaks litgpt published" in note for note in estimate_analytic(cfg).notes)


def test_litgpt_keeps_bf16_logits_in_chunks_and_no_fp32_copy():
    base = dict(model=dict(name="llama-3-8b", dtype="bf16"), data=dict(seq_len=1024), train=dict(micro_batch_size=2))
    hf = {t.name: t.bytes for t in estimate_analytic(validate_config(base)).terms}
    lit_cfg = validate_config(dict(base, model=dict(base["model"], implementation="litgpt")))
    lit = {t.name: t.bytes for t in estimate_analytic(lit_cfg).terms}
    cells = 2 * 1024 * shape_for("llama-3-8b").vocab_size
    assert hf["logits fp32 upcast"] == cells * 4 and "logits fp32 upcast" not in lit
    assert lit["logits"] == cells * 2
    assert lit["log-softmax kept for backward"] == pytest.approx(cells * 2, rel=1e-4)


def test_the_runner_and_the_traced_estimate_refuse_litgpt():
    cfg = validate_config(dict(model=dict(name="tiny-llama", implementation="litgpt")))
    assert [issue.key for issue in runner_issues(cfg)] == ["model.implementation"]
    with pytest.raises(TracedEstimateUnsupported, match="implementation litgpt"):
        estimate_traced(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"model": {"attn_implementation": "eager"}}, "model.attn_implementation"),
        ({"train": {"loss_chunk_tokens": 1024}}, "train.loss_chunk_tokens"),
    ],
)
def test_litgpt_configs_refuse_what_litgpt_does_not_have(override: dict, key: str):
    raw = {"model": {"name": "tiny-llama", "implementation": "litgpt"}}
    for section, values in override.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    assert [issue.key for issue in caught.value.issues] == [key]


def test_double_quantization_moves_the_quantised_weights_and_fsdps_gathered_units_alike():
    base = dict(
        model=dict(name="llama-2-7b", dtype="bf16", quantization="nf4"),
        train=dict(num_gpus=2),
        fsdp=dict(sharding_strategy="full_shard"),
    )
    terms = []
    for double in (True, False):
        cfg = validate_config(dict(base, model=dict(base["model"], double_quantization=double)))
        terms.append({t.name: t.bytes for t in estimate_analytic(cfg).terms})
    with_dq, without = terms
    weights = [name for name in with_dq if name.startswith("parameters, quantised linears")]
    gathered = [name for name in with_dq if name.startswith("FSDP FULL_SHARD gathered units")]
    assert weights and gathered
    assert all(without[name] > with_dq[name] for name in weights + gathered)
