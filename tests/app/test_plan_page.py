"""The Plan page: the estimate a user asks for before renting a GPU, checked against diagnosis's own answers."""

from __future__ import annotations

import json
from functools import partial

from app import nav
from app.views import plan as view
from diagnosis.accuracy import measured_error, trust_text
from diagnosis.analytic import estimate_analytic
from diagnosis.architecture import preset_config_dict, shape_for
from diagnosis.fit import largest_fitting
from diagnosis.gpus import gpu_capacity_bytes
from diagnosis.units import GIB, human_bytes
from tests.app.conftest import open_page, texts
from trainer.config import validate_config


def plan():
    return open_page(nav.PLAN)


def metrics(app) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.metric}


def knobs(**changes):
    return {**view.DEFAULTS, **changes}


def test_a_preset_on_a_card_shows_the_peak_its_parts_the_margin_and_what_fits():
    cfg = validate_config(view.config_from_knobs(view.DEFAULTS, "llama-3-8b"))
    estimate = estimate_analytic(cfg, gpu="A100 80GB")  # the card chosen sets the cuBLAS workspaces
    assert estimate.device_bytes < estimate_analytic(cfg).device_bytes  # not known: Hopper's, the larger
    capacity = gpu_capacity_bytes("A100 80GB")

    app = plan()

    assert not app.exception
    assert not app.error
    shown = metrics(app)
    assert shown["Peak allocated"] == human_bytes(estimate.peak_allocated_bytes)
    assert shown["Peak reserved"] == human_bytes(estimate.peak_reserved_bytes)
    assert shown["Device"] == human_bytes(estimate.device_bytes)
    assert shown["A100 80GB"] == human_bytes(capacity)
    assert app.success[0].value.startswith(f"Fits, with {human_bytes(capacity - estimate.device_bytes)} to spare")
    longest = largest_fitting(cfg, capacity, "data.seq_len", partial(estimate_analytic, gpu="A100 80GB")).value
    assert shown["Longest seq_len at micro-batch 1"] == f"{longest:,} tokens"
    table = app.dataframe[1].value
    assert list(table["Setting"])[:3] == ["as is", "+ gradient checkpointing", "+ sdpa attention"]
    assert len(app.get("vega_lite_chart")) == 2  # the estimate, and the side-by-side in its expander
    assert any(caption.value.startswith("Note: ") for caption in app.caption)  # the estimate's own notes
    # How far to trust it: the measured error, from the last bench run (diagnosis/measured_error.json).
    assert trust_text(measured_error()) in [caption.value for caption in app.caption]
    assert not app.button(key="plan.traced").disabled


def test_scenario_two_the_longest_sequence_on_32_gb_with_r16_and_checkpointing_and_alpha_changes_nothing():
    app = plan()
    app.selectbox(key="plan.model.name").set_value("qwen2-7b")
    app.selectbox(key="plan.gpu").set_value(view.CUSTOM_GPU).run()
    app.number_input(key="plan.capacity_gib").set_value(32.0)
    app.number_input(key="plan.lora.r").set_value(16)
    app.toggle(key="plan.model.gradient_checkpointing").set_value(True).run()

    assert not app.exception
    cfg = validate_config(
        view.config_from_knobs(knobs(**{"model.gradient_checkpointing": True, "lora.r": 16}), "qwen2-7b")
    )
    longest = largest_fitting(cfg, 32 * GIB, "data.seq_len").value
    before = metrics(app)
    assert before["Longest seq_len at micro-batch 1"] == f"{longest:,} tokens"
    assert before["a 32 GiB card"] == "32.0 GiB"

    app.number_input(key="plan.lora.alpha").set_value(64.0).run()

    assert metrics(app) == before  # every figure, to the digit
    shown = texts(app)
    assert "`lora.alpha` changes no memory: the estimate at alpha = 64 and at alpha = 128 is the same" in shown
    assert "Halving r to 8 would save " in shown and " MiB." in shown.split("Halving r to 8 would save ")[1][:20]


def test_a_model_too_big_for_the_card_says_by_how_much():
    app = plan()
    app.selectbox(key="plan.model.name").set_value("llama-2-70b")
    app.toggle(key="plan.lora_on").set_value(False).run()

    assert not app.exception
    cfg = validate_config(view.config_from_knobs(knobs(lora_on=False), "llama-2-70b"))
    over = estimate_analytic(cfg).device_bytes - gpu_capacity_bytes("A100 80GB")
    [verdict] = app.error
    assert verdict.value.startswith(f"Does not fit: {human_bytes(over)} over the card")
    assert "Full fine-tuning: every weight has a gradient and optimizer states." in texts(app)


def test_an_uploaded_config_json_is_estimated_like_the_same_architecture():
    app = plan()
    app.radio(key="plan.model_kind").set_value("upload").run()
    assert "Upload the model's `config.json`" in app.info[0].value
    content = json.dumps(preset_config_dict("qwen2.5-0.5b")).encode()

    app.file_uploader(key="plan.config_json").upload("config.json", content, "application/json").run()

    assert not app.exception
    assert not app.error
    assert "`config.json`: a qwen2 decoder, 24 layers, 0.49B parameters." in texts(app)
    same = validate_config(view.config_from_knobs(view.DEFAULTS, "qwen2.5-0.5b"))
    assert metrics(app)["Device"] == human_bytes(estimate_analytic(same).device_bytes)


def test_an_upload_that_is_not_a_readable_config_json_says_why():
    for content, expected in (
        (b"\x89PNG not json", "Not a JSON file"),
        (b"[1, 2]", "This JSON is not an object"),
        (json.dumps({"model_type": "t5", "d_model": 512}).encode(), "Cannot estimate this model: model_type 't5'"),
        (json.dumps({"model_type": "llama"}).encode(), "Cannot estimate this model: cannot read a llama decoder shape"),
    ):
        app = plan()
        app.radio(key="plan.model_kind").set_value("upload").run()
        app.file_uploader(key="plan.config_json").upload("config.json", content, "application/json").run()

        assert not app.exception
        [error] = app.error
        assert error.value.startswith(f"`config.json`: {expected}")
        assert not app.metric


def test_knobs_that_contradict_each_other_are_messages_naming_the_knob():
    app = plan()
    app.selectbox(key="plan.model.quantization").set_value("nf4")
    app.toggle(key="plan.lora_on").set_value(False)
    app.selectbox(key="plan.deepspeed.offload_params").set_value("cpu")
    app.selectbox(key="plan.train.mixed_precision").set_value("fp16").run()

    assert not app.exception
    errors = [element.value for element in app.error]
    assert any(error.startswith("`model.quantization`: nf4 base weights cannot be trained in full") for error in errors)
    assert "`deepspeed.offload_params`: needs deepspeed.zero_stage 3" in errors
    assert any(error.startswith("`train.mixed_precision`: fp16 autocast needs fp32 weights") for error in errors)
    assert not app.metric  # no estimate of a config that does not exist
    assert "Pick a model and a card" in app.info[0].value


def test_fsdp_across_gpus_is_estimated_with_its_own_layout_and_refused_beside_zero():
    app = plan()
    app.selectbox(key="plan.model.name").set_value("mistral-7b")
    app.toggle(key="plan.lora_on").set_value(False)
    app.number_input(key="plan.train.num_gpus").set_value(2)
    app.selectbox(key="plan.fsdp.sharding_strategy").set_value("full_shard").run()

    assert not app.exception and not app.error
    chosen = knobs(**{"lora_on": False, "train.num_gpus": 2, "fsdp.sharding_strategy": "full_shard"})
    cfg = validate_config(view.config_from_knobs(chosen, "mistral-7b"))
    assert cfg.fsdp is not None and cfg.fsdp.sharding_strategy == "full_shard"
    assert metrics(app)["Peak allocated"] == human_bytes(estimate_analytic(cfg).peak_allocated_bytes)

    app.selectbox(key="plan.deepspeed.zero_stage").set_value(3).run()
    assert any(error.value.startswith("`fsdp`: FSDP and DeepSpeed ZeRO both shard") for error in app.error)
    assert not app.metric


def test_the_traced_estimate_explains_a_config_it_cannot_trace():
    app = plan()
    app.selectbox(key="plan.model.quantization").set_value("nf4").run()

    app.button(key="plan.traced").click().run()

    assert not app.exception
    [warning] = app.warning
    assert warning.value.startswith("The traced estimate cannot model this config: model.quantization nf4")


def test_a_margin_thinner_than_the_reserves_measured_spread_says_so():
    cfg = validate_config(view.config_from_knobs(view.DEFAULTS, "llama-3-8b"))
    estimate = estimate_analytic(cfg)
    thin = estimate.device_bytes + estimate.peak_allocated_bytes // 50  # 2% of the peak to spare
    fits, text = view.margin_text(estimate, thin)
    assert fits and "real runs have held up to" in text and "short" in text
    roomy = estimate.device_bytes + estimate.peak_allocated_bytes // 2
    fits, text = view.margin_text(estimate, roomy)
    assert fits and "real runs have held up to" not in text


def test_scenario_5_two_models_side_by_side_say_which_needs_more_and_why():
    """A 32B full fine-tune at 4k tokens with eager attention, next to a 34B of another family."""
    app = plan()
    app.selectbox(key="plan.model.name").set_value("qwen2.5-32b").run()
    app.toggle(key="plan.lora_on").set_value(False)
    app.selectbox(key="plan.model.attn_implementation").set_value("eager")
    app.number_input(key="plan.train.num_gpus").set_value(8).run()
    app.selectbox(key="plan.deepspeed.zero_stage").set_value(3).run()
    assert not app.exception
    assert app.selectbox(key="plan.other.model.name").value == "yi-34b"

    chosen = knobs(
        **{"lora_on": False, "model.attn_implementation": "eager", "train.num_gpus": 8, "deepspeed.zero_stage": 3}
    )
    names = ("qwen2.5-32b", "yi-34b")
    qwen, yi = (estimate_analytic(validate_config(view.config_from_knobs(chosen, name))) for name in names)
    summary = view.side_by_side_summary(names, (qwen, yi), (shape_for(names[0]), shape_for(names[1])))
    assert summary in texts(app)
    # Eager attention keeps b·heads·s² scores per layer: Yi's 56 heads (and wider hidden size) against
    # Qwen's 40 make it the hungrier one at 4k tokens, whatever the parameter counts say.
    assert summary.startswith(f"yi-34b needs {human_bytes(yi.device_bytes - qwen.device_bytes)} more than qwen2.5-32b")
    assert "activations saved for backward" in summary and "attention heads 56 vs 40" in summary
    assert "layers 60 vs 64" not in summary  # a fact that points the other way explains nothing
    frame = app.dataframe[2].value
    assert list(frame.columns) == ["", "qwen2.5-32b", "yi-34b", "Difference"]
    rows = frame.set_index("")
    assert rows.loc["Vocabulary", "qwen2.5-32b"] == "152,064" and rows.loc["Vocabulary", "yi-34b"] == "64,000"
    assert rows.loc["Device (nvidia-smi)", "yi-34b"] == human_bytes(yi.device_bytes)
    assert any(text.startswith("**yi-34b on A100 80GB**") for text in (m.value for m in app.markdown))


def test_the_second_model_refuses_knobs_it_cannot_take_and_says_so():
    app = plan()
    app.selectbox(key="plan.other.model.name").set_value("gpt2").run()  # no q_proj / v_proj in GPT-2
    assert not app.exception
    assert any("on the second model" in w.value and "lora.target_modules" in w.value for w in app.warning)


def test_a_litgpt_run_is_estimated_as_litgpts_code_and_refuses_what_litgpt_lacks():
    app = plan()
    app.selectbox(key="plan.model.quantization").set_value("nf4")
    app.toggle(key="plan.model.double_quantization").set_value(False)
    app.selectbox(key="plan.model.implementation").set_value("litgpt").run()

    assert not app.exception and not app.error
    chosen = knobs(
        **{"model.quantization": "nf4", "model.double_quantization": False, "model.implementation": "litgpt"}
    )
    cfg = validate_config(view.config_from_knobs(chosen, "llama-3-8b"))
    litgpt = estimate_analytic(cfg, gpu="A100 80GB")
    assert metrics(app)["Peak allocated"] == human_bytes(litgpt.peak_allocated_bytes)
    transformers = estimate_analytic(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"implementation": "transformers"})})
    )
    assert litgpt.peak_allocated_bytes != transformers.peak_allocated_bytes

    app.selectbox(key="plan.model.attn_implementation").set_value("eager").run()
    assert any(
        error.value.startswith("`model.attn_implementation`: litgpt's GPT always runs torch SDPA")
        for error in app.error
    )
    assert not app.metric
