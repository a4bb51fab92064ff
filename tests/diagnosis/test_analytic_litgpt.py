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
    # A user planning a litgpt run is told what the walk counts of litgpt's loop.
    cfg = validate_config(dict(model=dict(model, implementation="litgpt")))
    assert any("holds the previous micro-batch's logits" in note for note in estimate_analytic(cfg).notes)


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


# --- the previous micro-batch's graph, held by litgpt's loop -----------------------------------------
QLORA_7B = dict(
    model=dict(
        name="llama-2-7b", dtype="bf16", quantization="nf4", prepare_for_kbit_training=False, implementation="litgpt"
    ),
    lora=dict(r=32, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"]),
    data=dict(seq_len=512),
    train=dict(micro_batch_size=2, grad_accum_steps=4, optimizer="paged_adamw"),
)
PREVIOUS_GRAPH = "activations: the previous micro-batch's graph, held by litgpt's loop"
PREVIOUS_LOGITS = "logits of the previous micro-batch, held by litgpt's loop"


def test_litgpt_holds_every_4bit_input_of_the_previous_micro_batch_with_old_bitsandbytes():
    """bitsandbytes 0.42.0's MatMul4Bit sets ctx.tensors = (A, B) for an input that needs a gradient;
    litgpt's `logits` keeps that graph until the next forward returns. Layer 0's qkv input (the norm
    of a frozen embedding) needs none; its attention output does, as does every later input."""
    cfg = validate_config(QLORA_7B)
    s = shape_for("llama-2-7b")
    c, i, tokens = s.hidden_size, s.intermediate_size, 2 * 512
    # qkv, attention output projection, the norm both MLP inputs share, the down projection; then lm_head's.
    per_layer, layer0, head = 3 * c + i, 2 * c + i, c
    expected = (per_layer * (s.num_layers - 1) + layer0 + head) * tokens * 2

    steady = estimate_analytic(cfg, bitsandbytes="0.42.0")
    first = estimate_analytic(cfg, bitsandbytes="0.42.0", first_micro_batch=True)
    fixed = estimate_analytic(cfg, bitsandbytes="0.43.2")
    terms = {t.name: t.bytes for t in steady.terms}
    assert terms[PREVIOUS_GRAPH] == expected
    assert terms[PREVIOUS_LOGITS] == tokens * s.vocab_size * 2
    # The held graph sets the peak: the next forward, on top of this one's activations.
    assert steady.peak_phase == "forward" and first.peak_phase == "backward"
    held_gradients = steady.totals["gradients"]  # accumulation: the first micro-batch has none yet
    assert steady.peak_allocated_bytes - first.peak_allocated_bytes == pytest.approx(
        expected + held_gradients, rel=0.01
    )
    # The first micro-batch has no earlier graph; a fixed bitsandbytes keeps no inputs on its ctx.
    assert PREVIOUS_GRAPH not in {t.name for t in first.terms}
    assert PREVIOUS_GRAPH not in {t.name for t in fixed.terms}
    assert fixed.peak_allocated_bytes < first.peak_allocated_bytes


def test_only_litgpts_loop_holds_a_previous_graph():
    hf = dict(QLORA_7B, model=dict(QLORA_7B["model"], implementation="transformers"))
    names = {t.name for t in estimate_analytic(validate_config(hf), bitsandbytes="0.42.0").terms}
    assert PREVIOUS_GRAPH not in names and PREVIOUS_LOGITS not in names


def test_a_graph_is_freed_by_its_end_not_by_backward_for_what_a_ctx_holds():
    """The premise on the installed torch, in litgpt's loop shape (`logits = model(x)` rebound each
    micro-batch): a Function that keeps its input on ctx, as bitsandbytes before 0.43.2 does, keeps it
    past backward until the next forward returns; one that saves it for backward does not."""
    import gc
    import weakref

    import torch

    class KeepsOnCtx(torch.autograd.Function):  # bitsandbytes 0.42.0 MatMul4Bit's bookkeeping
        @staticmethod
        def forward(ctx, a, w):
            ctx.tensors = (a, w)
            return a @ w.t()

        @staticmethod
        def backward(ctx, grad):
            _, w = ctx.tensors
            return grad @ w, None

    class SavesForBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, w):
            ctx.save_for_backward(a, w)
            return a @ w.t()

        @staticmethod
        def backward(ctx, grad):
            _, w = ctx.saved_tensors
            return grad @ w, None

    def alive_after_backward(function) -> tuple[bool, bool]:
        w = torch.randn(8, 8)
        adapter = torch.randn(8, 8, requires_grad=True)
        alive = {}
        logits = None
        for step in range(2):
            x = torch.randn(4, 8) @ adapter  # needs a gradient, as a LoRA output does
            weakref.finalize(x.untyped_storage(), alive.__setitem__, step, False)
            alive[step] = True
            new_logits = function.apply(x, w)
            del x
            gc.collect()
            if step == 1:
                during_next_forward = alive[0]
            logits = new_logits  # the loop's rebinding: the previous graph goes here
            del new_logits
            logits.sum().backward()
            gc.collect()
            if step == 0:
                after_backward = alive[0]
        del logits
        gc.collect()
        return after_backward, during_next_forward

    assert alive_after_backward(KeepsOnCtx) == (True, True)
    assert alive_after_backward(SavesForBackward) == (False, False)
