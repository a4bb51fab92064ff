"""Rules of the suggestion engine on real OOM messages, with a small stand-in estimator whose
numbers are easy to check by hand (the real estimators are tested on their own, and together with
this engine in test_suggest_runs.py)."""

from pathlib import Path

import pytest
import yaml

from diagnosis.analytic import estimate_analytic
from diagnosis.estimate import BREAKDOWN_KEYS, MemoryEstimate
from diagnosis.oom_text import parse_oom
from diagnosis.suggest import CATEGORIES, Evidence, suggest
from diagnosis.units import GIB, MIB, human_bytes
from trainer.config import RunConfig, validate_config

MESSAGES = {
    m["id"]: m["text"]
    for m in yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "fixtures" / "oom_messages" / "messages.yaml").read_text()
    )["messages"]
}


def toy_estimator(cfg: RunConfig, device: str = "cuda") -> MemoryEstimate:
    """Bytes that follow the shape of the real thing: states scale with trainable weights, activations
    with batch × length (× length again under eager attention), checkpointing keeps a tenth."""
    weights = 4 * GIB if cfg.model.dtype == "fp32" else 2 * GIB
    trainable = 0.001 * cfg.lora.r / 8 if cfg.lora is not None else 1.0
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    activations = tokens * 256 * 1024
    if cfg.model.attn_implementation == "eager":
        activations += cfg.train.micro_batch_size * cfg.data.seq_len**2 * 4096
    if cfg.model.gradient_checkpointing:
        activations //= 10
    states = {"adamw": 2.0, "adamw_8bit": 0.5, "sgd": 0.0}.get(cfg.train.optimizer, 2.0) * weights * trainable
    breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0)
    breakdown.update(
        parameters=weights, gradients=int(weights * trainable), optimizer_states=int(states), activations=activations
    )
    return MemoryEstimate("analytic", breakdown, "forward", totals=dict(breakdown))


def categories(items) -> list[str]:
    return [s.category for s in items]


def test_every_suggestion_has_the_contract_fields():
    cfg = validate_config({"model": {"attn_implementation": "eager"}, "lora": None, "data": {"seq_len": 2048}})
    items = suggest(Evidence(config=cfg, capacity_bytes=8 * GIB), toy_estimator)
    assert items and set(categories(items)) <= set(CATEGORIES)
    for s in items:
        data = s.to_json()
        assert {"category", "change", "saves_bytes", "confidence", "why"} <= set(data)
        assert data["confidence"] in ("high", "medium", "low") and data["why"].strip()
        assert data["saves_bytes"] is not None or data["saves_reason"]


@pytest.mark.parametrize("message_id", ["cuda21_zero_free_no_nvml", "backward_call_chain"])
def test_a_request_the_cache_could_have_served_puts_expandable_segments_first(message_id):
    message = parse_oom(MESSAGES[message_id])
    cfg = validate_config({"data": {"vary_length": True, "min_seq_len": 64}})
    items = suggest(Evidence(config=cfg, message=message), toy_estimator)
    first = items[0]
    assert first.category == "alloc_conf" and first.confidence == "high"
    assert first.change.startswith("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    assert first.patch == {"memory.alloc_conf": "expandable_segments:True"}
    assert first.saves_bytes == message.reserved_unallocated_bytes > message.requested_bytes


def test_before_torch_2_1_the_allocator_advice_is_max_split_size_mb():
    message = parse_oom(MESSAGES["cuda_reserved_no_hint"])  # 152 MiB request, 5.8 GiB cached but split
    first = suggest(Evidence(message=message))[0]
    assert first.category == "alloc_conf" and "max_split_size_mb:128" in first.change
    assert "expandable_segments needs torch >= 2.1" in first.why


def test_allocator_settings_are_said_not_to_help_when_nothing_was_cached():
    message = parse_oom(MESSAGES["rich_logging_columns"])  # 3.9 GiB request, 6.7 MiB cached
    items = suggest(Evidence(message=message))
    alloc = next(s for s in items if s.category == "alloc_conf")
    assert not alloc.helps and "cannot make this fit" in alloc.why
    assert items[-1] is alloc  # cannot-help fixes come last
    other = next(s for s in items if s.category == "other_process")
    assert "process 248104 holds 37.5 GiB" in other.why


def test_lowering_lora_rank_is_called_out_as_not_the_problem():
    cfg = validate_config({"lora": {"r": 64}, "data": {"seq_len": 4096}, "model": {"attn_implementation": "eager"}})
    items = suggest(Evidence(config=cfg, capacity_bytes=16 * GIB), toy_estimator)
    lora = next(s for s in items if s.category == "lora")
    assert not lora.helps and "not your problem" in lora.why and "from 64 to 8" in lora.why
    assert lora.saves_bytes < 128 * MIB
    assert items[0].category == "efficient_attention" and items[0].sufficient


def test_what_if_savings_are_the_estimators_differences():
    cfg = validate_config({"data": {"seq_len": 1024}, "train": {"micro_batch_size": 4}})
    items = {s.category: s for s in suggest(Evidence(config=cfg, capacity_bytes=2 * GIB), toy_estimator)}
    base = toy_estimator(cfg).device_bytes
    checkpointed = toy_estimator(validate_config({**cfg.to_dict(), "model": {"gradient_checkpointing": True}}))
    assert items["gradient_checkpointing"].saves_bytes == base - checkpointed.device_bytes
    halved = items["reduce_batch"]
    assert halved.patch == {"train.micro_batch_size": 2, "train.grad_accum_steps": 2}


def test_cheapest_sufficient_fix_beats_a_bigger_costlier_one():
    # Eager at 2k tokens: sdpa removes the L² scores, checkpointing saves more but costs recompute.
    cfg = validate_config({"model": {"attn_implementation": "eager"}, "data": {"seq_len": 2048}})
    items = suggest(Evidence(config=cfg, capacity_bytes=int(toy_estimator(cfg).device_bytes * 0.8)), toy_estimator)
    ranked = categories(items)
    assert ranked.index("efficient_attention") < ranked.index("gradient_checkpointing")
    assert ranked[0] == "efficient_attention"


def test_host_memory_for_the_cpu_allocator_and_no_allocator_setting():
    message = parse_oom(MESSAGES["cpu_posix"])
    items = suggest(Evidence(message=message))
    assert "host_memory" in categories(items) and "alloc_conf" not in categories(items)


def test_a_checkpoint_save_failure_points_at_the_save_path():
    message = parse_oom(MESSAGES["python_memory_error_torch_save"])
    assert message.location == "checkpoint_save"
    assert "checkpoint_save" in categories(suggest(Evidence(message=message)))
    # The same numbers without a traceback say nothing about saving.
    bare = parse_oom(MESSAGES["checkpoint_save_no_traceback"])
    assert "checkpoint_save" not in categories(suggest(Evidence(message=bare)))


def test_a_leak_comes_first_and_says_no_config_fixes_it():
    postmortem = {
        "device": "cpu",
        "requested_bytes": 64 * MIB,
        "finding_details": {"trend": {"growth_bytes": 800 * MIB, "bytes_per_step": 16 * MIB, "since_step": 3}},
    }
    cfg = validate_config({"debug": {"leak_mb_per_step": 16}, "memory": {"limit_gb": 1}})
    items = suggest(Evidence(config=cfg, postmortem=postmortem), toy_estimator)
    assert items[0].category == "leak" and items[0].patch == {"debug.leak_mb_per_step": 0}
    assert "16.0 MiB per step" in items[0].why and "No config change fixes a leak" in items[0].why


def test_nothing_known_gives_no_suggestion_rather_than_generic_advice():
    assert suggest(Evidence()) == []


def test_a_snapshot_with_expandable_segments_on_gets_no_allocator_advice():
    from diagnosis.snapshot import read_snapshot

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "snapshots"
    snapshot = read_snapshot(fixtures / "SunnySood80__unsupervised_finetune_resnet50__7c75eafd28__dump_snapshot.pickle")
    assert snapshot.to_json()["allocator_settings"]["expandable_segments"] is True
    message = parse_oom(MESSAGES["backward_call_chain"])
    with_snapshot = suggest(Evidence(message=message, snapshot=snapshot.to_json()))
    assert "alloc_conf" not in categories(with_snapshot)
    assert "alloc_conf" in categories(suggest(Evidence(message=message)))


def test_a_snapshots_oom_event_supplies_the_request_and_the_cache():
    snapshot = {
        "ooms": [
            {
                "requested_bytes": 2 * GIB,
                "device_free_bytes": 0,
                "allocated_bytes": 70 * GIB,
                "reserved_bytes": 75 * GIB,
            }
        ],
        "allocator_settings": {},
    }
    first = suggest(Evidence(snapshot=snapshot, torch_version="2.5.1"))[0]
    assert first.category == "alloc_conf" and first.saves_bytes == 5 * GIB and first.confidence == "high"


def mistral_full_fine_tune_suggestions(gpus: int, capacity_gib: int, **sections: dict) -> dict:
    """The real analytic estimator's suggestions for a bf16 Mistral-7B full fine-tune at 4k tokens, by change."""
    from diagnosis.analytic import estimate_analytic

    cfg = validate_config(
        {
            "model": {"name": "mistral-7b", "dtype": "bf16", "gradient_checkpointing": True},
            "lora": None,
            "data": {"seq_len": 4096},
            "train": {"num_gpus": gpus},
            **sections,
        }
    )
    items = suggest(Evidence(config=cfg, capacity_bytes=capacity_gib * GIB), estimate_analytic)
    return {item.change: item for item in items}


def test_an_fsdp_run_is_told_its_own_keys_not_deepspeeds():
    by_change = mistral_full_fine_tune_suggestions(4, 40, fsdp={"sharding_strategy": "shard_grad_op"})
    assert by_change["fsdp.sharding_strategy=full_shard"].category == "zero"
    assert by_change["fsdp.sharding_strategy=full_shard"].saves_bytes > 5 * GIB  # the weights, ÷ 4 instead of whole
    assert by_change["fsdp.offload_params=true"].category == "offload"
    assert not any("deepspeed" in change for change in by_change)


def test_a_data_parallel_run_that_shards_nothing_hears_of_fsdp_beside_zero_when_it_saves_more():
    by_change = mistral_full_fine_tune_suggestions(8, 80)
    zero, fsdp = by_change["deepspeed.zero_stage=2"], by_change["fsdp.sharding_strategy=full_shard"]
    # bf16 weights: ZeRO-2 keeps the weights whole and adds fp32 master weights and states (12 B a
    # parameter, sharded); FSDP shards the weights too and keeps bf16 states (4 B a parameter).
    assert fsdp.saves_bytes > zero.saves_bytes > 0
    assert "no fp32 master copy" in fsdp.why and "more than the ZeRO change" in fsdp.why


def _qlora(seq_len: int = 2048) -> RunConfig:
    return validate_config(
        {
            "model": {"name": "llama-2-7b", "dtype": "bf16", "quantization": "nf4"},
            "data": {"seq_len": seq_len},
            "train": {"micro_batch_size": 2},
        }
    )


def test_an_old_bitsandbytes_is_told_to_upgrade_with_the_bytes_the_estimator_says_it_saves():
    from diagnosis.analytic import estimate_analytic

    cfg = _qlora()
    items = suggest(Evidence(config=cfg, bitsandbytes_version="0.42.0"), estimate_analytic)
    upgrade = [s for s in items if s.change == "pip install 'bitsandbytes>=0.43.2'"]
    assert len(upgrade) == 1 and upgrade[0].category == "quantization"
    old = estimate_analytic(cfg, bitsandbytes="0.42.0").device_bytes
    assert upgrade[0].saves_bytes == old - estimate_analytic(cfg, bitsandbytes="0.43.2").device_bytes
    assert upgrade[0].saves_bytes > GIB  # every 4-bit linear's input of 2 × 2,048 tokens, 32 layers
    assert "0.42.0" in upgrade[0].why
    # Every what-if of the same evidence is measured with the same old bitsandbytes.
    shorter = next(s for s in items if s.category == "reduce_seq_len")
    halved = estimate_analytic(validate_config({**cfg.to_dict(), "data": {"seq_len": 1024}}), bitsandbytes="0.42.0")
    assert shorter.patch == {"data.seq_len": 1024}
    assert shorter.saves_bytes == old - halved.device_bytes


def test_a_current_bitsandbytes_or_an_unquantised_run_hears_nothing_of_upgrading():
    from diagnosis.analytic import estimate_analytic

    unquantised = validate_config({"model": {"name": "llama-2-7b", "dtype": "bf16"}})
    for evidence in (
        Evidence(config=_qlora(), bitsandbytes_version="0.43.3"),
        Evidence(config=unquantised, bitsandbytes_version="0.42.0"),
    ):
        assert not [s for s in suggest(evidence, estimate_analytic) if "bitsandbytes>=" in s.change]


def test_a_recorded_runs_library_versions_come_from_its_environment():
    from diagnosis.suggest import evidence_for_run

    environment = {"versions": {"torch": "2.3.1", "bitsandbytes": "0.42.0", "transformers": "4.45.2"}}
    evidence = evidence_for_run(None, _qlora().to_dict(), environment)
    assert (evidence.torch_version, evidence.bitsandbytes_version) == ("2.3.1", "0.42.0")
    assert evidence.transformers_version == "4.45.2"


def test_every_what_if_is_estimated_with_the_transformers_that_ran():
    calls = []

    def estimator(cfg, *, device, **versions):
        calls.append(versions)
        return estimate_analytic(cfg, device=device, **versions)

    suggest(Evidence(config=_qlora(), transformers_version="4.45.2"), estimator)
    assert len(calls) > 1 and all(call.get("transformers") == "4.45.2" for call in calls)


def _gpt_bigcode(folder: Path, **sections) -> RunConfig:
    (folder / "config.json").write_text(
        '{"model_type": "gpt_bigcode", "vocab_size": 4096, "n_embd": 256, "n_inner": 1024, "n_layer": 8, '
        '"n_head": 4, "n_positions": 2048}'
    )
    raw = {
        "model": {"name": str(folder), "dtype": "bf16", "gradient_checkpointing": True},
        "lora": {"target_modules": ["c_attn"]},
        "data": {"seq_len": 2048},
        "train": {"micro_batch_size": 4},
    }
    return validate_config({**raw, **sections})


def test_checkpointing_that_the_transformers_silently_skips_is_named_with_the_upgrade(tmp_path: Path):
    """GPTBigCode on transformers 4.54-4.57 ignores gradient_checkpointing=true (diagnosis.libraries):
    the top fix is the release that checkpoints again, with the bytes it saves. The loss is chunked
    already, so that the cheaper chunked_loss fix (which closes this shortfall too) is not in the way."""
    cfg = _gpt_bigcode(tmp_path, train={"micro_batch_size": 4, "loss_chunk_tokens": 512})
    # A card 100 MiB short of the step: the cheapest fix that closes it comes first.
    capacity = estimate_analytic(cfg, transformers="4.56.0").device_bytes - 100 * MIB
    items = suggest(Evidence(config=cfg, capacity_bytes=capacity, transformers_version="4.56.0"), estimate_analytic)
    assert items[0].change == "pip install 'transformers>=5.0.0'"
    assert items[0].category == "gradient_checkpointing" and items[0].saves_bytes > 100 * MIB
    assert not [
        s
        for s in suggest(Evidence(config=cfg, transformers_version="5.0.0"), estimate_analytic)
        if "transformers>=" in s.change
    ]


def test_lora_is_suggested_on_the_models_own_attention_projections(tmp_path: Path):
    items = suggest(Evidence(config=_gpt_bigcode(tmp_path, lora=None)), estimate_analytic)
    lora = [s for s in items if s.category == "lora"]
    assert lora and lora[0].patch["lora"]["target_modules"] == ["c_attn", "c_proj"]  # not Llama's q_proj…


def test_a_checkpointing_saving_larger_than_the_activations_says_it_is_counted_on_the_device():
    """The what-if compares device bytes, where the allocator's reserve shrinks with the tensors:
    a saving above the activations quoted beside it must say why, or it reads as an error."""
    cfg = validate_config(
        {
            "model": {"name": "qwen2.5-7b", "dtype": "bf16"},
            "lora": {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "data": {"seq_len": 4096},
            "train": {"micro_batch_size": 2},
        }
    )
    (item,) = [
        s for s in suggest(Evidence(config=cfg, capacity_bytes=80 * GIB)) if s.category == "gradient_checkpointing"
    ]
    activations = estimate_analytic(cfg).breakdown["activations"]
    assert item.saves_bytes > activations
    assert "on the device, the allocator's reserve on those bytes included" in item.why
    (on_cpu,) = [
        s
        for s in suggest(
            Evidence(config=cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"})}))
        )
        if s.category == "gradient_checkpointing"
    ]
    assert "reserve" not in on_cpu.why  # no allocator reserve on the CPU: the saving is the activations'


def test_a_forward_that_failed_part_way_is_measured_against_the_whole_steps_activations():
    """examples/cpu-oom.yaml dies in layer 0's attention with 7 MiB saved: a saving of hundreds of
    MiB is set beside the whole step's activations (estimated), not explained away by an allocator
    reserve the CPU does not have."""
    cfg = validate_config(
        {
            "model": {"name": "tiny-llama", "attn_implementation": "eager"},
            "data": {"seq_len": 4096},
            "train": {"device": "cpu"},
            "memory": {"limit_gb": 0.25},
        }
    )
    postmortem = {"phase": "forward", "device": "cpu", "tensors": {"activation_bytes": 7 * MIB}}
    (item,) = [
        s
        for s in suggest(Evidence(config=cfg, postmortem=postmortem), estimate_analytic)
        if s.category == "gradient_checkpointing"
    ]
    whole = estimate_analytic(cfg, device="cpu").breakdown["activations"]
    assert item.saves_bytes > 7 * MIB and "reserve" not in item.why
    assert "7.0 MiB (saved so far by the forward that failed)" in item.why
    assert f"{human_bytes(whole)} for the whole step (estimated)" in item.why


# --- the loss in chunks ------------------------------------------------------------------------------
def _qwen_7b_lora(**train) -> RunConfig:
    return validate_config(
        {
            "model": {"name": "qwen2.5-7b", "dtype": "bf16", "gradient_checkpointing": True},
            "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "data": {"seq_len": 4096},
            "train": {"micro_batch_size": 2, **train},
        }
    )


def test_logits_that_dominate_a_checkpointed_step_put_the_chunked_loss_first():
    """Qwen2.5-7B, LoRA, checkpointing, 2 × 4,096 tokens on a 24 GB card: with the layers
    checkpointed, the 152k-vocabulary logits and loss are half the step, and nothing else fixes them
    without changing the batch or the model."""
    items = suggest(Evidence(config=_qwen_7b_lora(), capacity_bytes=24 * GIB), estimate_analytic)
    first = items[0]
    assert first.category == "chunked_loss" and first.sufficient and first.confidence == "high"
    assert first.patch == {"train.loss_chunk_tokens": 1024} and first.saves_bytes > 10 * GIB
    assert "8,192 tokens" in first.why and "same loss and gradients" in first.why
    chunked = suggest(
        Evidence(config=_qwen_7b_lora(loss_chunk_tokens=1024), capacity_bytes=24 * GIB), estimate_analytic
    )
    assert "chunked_loss" not in categories(chunked)


def test_a_pasted_log_that_failed_in_the_logits_names_the_chunked_loss_without_a_size():
    message = parse_oom(MESSAGES["mps_logits"])  # `logits = logits / self.temperature`, a real MPS report
    items = suggest(Evidence(message=message))
    chunked = [s for s in items if s.category == "chunked_loss"]
    assert len(chunked) == 1 and chunked[0].saves_bytes is None and chunked[0].saves_reason
    assert "use_liger_kernel=True" in chunked[0].why and "train.loss_chunk_tokens" in chunked[0].why
    elsewhere = parse_oom(MESSAGES["backward_call_chain"])
    assert elsewhere.location != "logits_loss"
    assert "chunked_loss" not in categories(suggest(Evidence(message=elsewhere)))


def test_a_shorter_sequence_is_the_longest_that_fits_not_a_blind_half():
    """With a budget known, the cap comes from the fit solver (rounded down to 64 tokens): it cuts
    only what has to go. Without one, halving stands."""
    from diagnosis.fit import largest_fitting

    cfg = validate_config(
        {
            "model": {"name": "llama-3-8b", "dtype": "bf16"},
            "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]},
            "data": {"seq_len": 8192, "vary_length": True},
            "train": {"micro_batch_size": 1},
        }
    )
    longest = largest_fitting(cfg, 40 * GIB, "data.seq_len", estimate_analytic).value
    assert 1024 < longest < 8192
    (item,) = [
        s
        for s in suggest(Evidence(config=cfg, capacity_bytes=40 * GIB), estimate_analytic)
        if s.category == "reduce_seq_len"
    ]
    assert item.patch == {"data.seq_len": longest // 64 * 64} and item.sufficient
    assert f"{longest // 64 * 64:,} tokens is the longest sequence whose estimated step fits in 40.0 GiB" in item.why
    assert "only the batches longer than that are cut" in item.why
    (halved,) = [s for s in suggest(Evidence(config=cfg), estimate_analytic) if s.category == "reduce_seq_len"]
    assert halved.patch == {"data.seq_len": 4096}


def test_a_smaller_micro_batch_is_the_largest_divisor_that_fits_with_the_effective_batch_kept():
    from diagnosis.fit import largest_fitting

    cfg = validate_config(
        {
            "model": {"name": "llama-3.2-1b", "dtype": "bf16"},
            "data": {"seq_len": 4096},
            "train": {"micro_batch_size": 8, "grad_accum_steps": 2},
        }
    )
    largest = largest_fitting(cfg, 40 * GIB, "train.micro_batch_size", estimate_analytic).value
    target = max(d for d in (1, 2, 4) if d <= largest)
    assert target < 4  # not the blind half
    (item,) = [
        s
        for s in suggest(Evidence(config=cfg, capacity_bytes=40 * GIB), estimate_analytic)
        if s.category == "reduce_batch"
    ]
    assert item.patch == {"train.micro_batch_size": target, "train.grad_accum_steps": 2 * 8 // target}
    assert item.sufficient and "keeps the effective batch (16)" in item.why
    (halved,) = [s for s in suggest(Evidence(config=cfg), estimate_analytic) if s.category == "reduce_batch"]
    assert halved.patch == {"train.micro_batch_size": 4, "train.grad_accum_steps": 4}


def test_states_a_first_step_had_not_made_yet_are_quoted_from_the_estimate_not_as_zero():
    cfg = validate_config(
        {"model": {"name": "llama-3.2-1b", "dtype": "bf16"}, "lora": None, "train": {"device": "cpu"}}
    )
    postmortem = {"step": 1, "phase": "forward", "device": "cpu", "tensors": {"optimizer_state_bytes": 0}}
    (item,) = [
        s
        for s in suggest(Evidence(config=cfg, postmortem=postmortem), estimate_analytic)
        if s.category == "optimizer_8bit"
    ]
    states = estimate_analytic(cfg, device="cpu").breakdown["optimizer_states"]
    assert f"({human_bytes(states)}, estimated: not created yet when step 1 failed)" in item.why
    later = {**postmortem, "step": 7, "tensors": {"optimizer_state_bytes": states}}
    (item,) = [
        s for s in suggest(Evidence(config=cfg, postmortem=later), estimate_analytic) if s.category == "optimizer_8bit"
    ]
    assert "measured at the failure" in item.why


def test_an_odd_micro_batch_is_cut_to_a_divisor_so_the_effective_batch_stays():
    cfg = validate_config({"model": {"name": "llama-3.2-1b", "dtype": "bf16"}, "train": {"micro_batch_size": 3}})
    (item,) = [s for s in suggest(Evidence(config=cfg), estimate_analytic) if s.category == "reduce_batch"]
    assert item.patch == {"train.micro_batch_size": 1, "train.grad_accum_steps": 3}
    assert "3× the accumulation keeps the effective batch (3)" in item.why


@pytest.mark.parametrize("head", ["lm_head", "embed_out"])
def test_a_post_mortem_placed_in_the_lm_head_proposes_the_chunked_loss_whatever_the_family_calls_it(head: str):
    # GPT-NeoX (Pythia) calls its head embed_out; without a config the loss is proposed unsized.
    postmortem = {"module": head, "phase": "forward", "module_stack": [head], "error_text": "CUDA out of memory."}
    categories = [item.category for item in suggest(Evidence(postmortem=postmortem))]
    assert "chunked_loss" in categories
    other = {**postmortem, "module": "gpt_neox.layers.3.mlp", "module_stack": ["gpt_neox.layers.3.mlp"]}
    assert "chunked_loss" not in [item.category for item in suggest(Evidence(postmortem=other))]


def test_checkpointing_for_a_one_gpu_litgpt_run_says_litgpts_scripts_do_not_offer_it():
    run = {"data": {"seq_len": 4096}, "train": {"micro_batch_size": 4}}
    model = {"name": "llama-3-8b", "dtype": "bf16"}
    litgpt = validate_config({"model": {**model, "implementation": "litgpt"}, **run})
    transformers = validate_config({"model": model, **run})
    [lit] = [item for item in suggest(Evidence(config=litgpt)) if item.category == "gradient_checkpointing"]
    [hf] = [item for item in suggest(Evidence(config=transformers)) if item.category == "gradient_checkpointing"]
    assert lit.confidence == "low" and "only with FSDP across devices" in lit.why
    assert hf.confidence != "low" and "litgpt" not in hf.why
    assert lit.saves_bytes and lit.saves_bytes > 0
    # Nor DeepSpeed, which litgpt does not run, for a multi-GPU litgpt plan.
    several = validate_config({"model": {**model, "implementation": "litgpt"}, **run, "train": {"num_gpus": 4}})
    assert not [item for item in suggest(Evidence(config=several)) if item.category in ("zero", "offload")]
    same = validate_config({"model": model, **run, "train": {"num_gpus": 4}})
    assert [item for item in suggest(Evidence(config=same)) if item.category == "zero"]


def test_checkpointing_for_litgpt_qlora_names_the_previous_micro_batch_it_holds():
    """The saving exceeds the activations named: litgpt's loop holds the last micro-batch's 4-bit inputs
    (bitsandbytes before 0.43.2), which a checkpointed step does not keep; the why says so."""
    model = {"name": "llama-2-7b", "dtype": "bf16", "quantization": "nf4", "implementation": "litgpt"}
    cfg = validate_config({"model": {**model, "prepare_for_kbit_training": False}, "data": {"seq_len": 512}})
    old = Evidence(config=cfg, bitsandbytes_version="0.42.0")
    [item] = [s for s in suggest(old) if s.category == "gradient_checkpointing"]
    assert "also holds the previous micro-batch's quantised-linear inputs (" in item.why
    fixed = Evidence(config=cfg, bitsandbytes_version="0.43.2")
    [item] = [s for s in suggest(fixed) if s.category == "gradient_checkpointing"]
    assert "previous micro-batch" not in item.why
