"""Which library versions change an estimate, read from versions and requirements alike."""

import pytest

from diagnosis.libraries import (
    LATEST,
    Libraries,
    LossLayout,
    bitsandbytes_keeps_matmul_input,
    ignores_checkpointing,
    installed_version,
    keeps_training_cache,
    loss_layout,
    parse_version,
)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("0.43.3", (0, 43, 3)), (">=0.43.0", (0, 43, 0)), ("0.42.0.dev1", (0, 42, 0)), (LATEST, None), (None, None)],
)
def test_versions_and_requirements_give_their_release_numbers(text, parsed):
    assert parse_version(text) == parsed


@pytest.mark.parametrize(
    ("version", "keeps"),
    [("0.41.1", True), ("0.42.0", True), ("0.43.1", True), ("0.43.2", False), ("0.45.0", False), (None, False)],
)
def test_bitsandbytes_kept_4bit_inputs_until_0_43_2(version, keeps):
    assert bitsandbytes_keeps_matmul_input(version) is keeps


OWN_16_BIT = LossLayout(upcast=False, shifted_copy=True, keeps_head_output=True)
OWN_FP32 = LossLayout(upcast=True, shifted_copy=True, keeps_head_output=False)
SHARED_OLD = LossLayout(upcast=True, shifted_copy=True, keeps_head_output=True)


@pytest.mark.parametrize(
    ("model_type", "version", "layout"),
    [
        ("gpt2", "4.48.0", OWN_16_BIT),
        ("gpt_bigcode", "4.45.2", OWN_16_BIT),
        ("stablelm", "4.47.0", OWN_16_BIT),
        ("llama", "4.45.2", OWN_FP32),
        ("llama", "4.46.0", SHARED_OLD),
        ("mistral", "4.47.0", OWN_FP32),
        ("mistral", "4.48.0", SHARED_OLD),
        ("some_new_model", "4.40.0", SHARED_OLD),  # unknown before 4.49: the larger old layout
        ("gpt2", "4.49.0", LossLayout()),
        ("llama", "5.0.0", LossLayout()),
        ("gpt2", None, LossLayout()),  # unknown version: current behaviour
        ("gpt2", LATEST, LossLayout()),
    ],
)
def test_the_loss_layout_follows_the_release_that_moved_each_model_to_the_shared_loss(model_type, version, layout):
    assert loss_layout(model_type, version) == layout
    assert Libraries(transformers=version).loss_layout(model_type) == layout


def test_named_versions_win_over_the_installed_ones():
    named = Libraries.that_run(bitsandbytes="0.42.0", transformers="4.45.2", torch="2.4.1")
    assert named == Libraries(bitsandbytes="0.42.0", transformers="4.45.2", torch="2.4.1")
    assert named.bnb_keeps_matmul_input and named.checkpoints_reentrantly
    assert Libraries.that_run().transformers == installed_version("transformers")


@pytest.mark.parametrize(
    ("model_type", "version", "checkpointing", "keeps"),
    [
        ("gpt_bigcode", "4.45.2", True, True),
        ("gpt_bigcode", "4.52.0", True, True),
        ("gpt_bigcode", "4.53.0", True, False),
        ("gpt_bigcode", "4.45.2", False, False),  # without checkpointing autograd keeps those outputs anyway
        ("llama", "4.45.2", True, False),  # every other family turned the cache off
        ("gpt_bigcode", None, True, False),
    ],
)
def test_only_gpt_bigcode_before_4_53_kept_its_cache_in_checkpointed_training(
    model_type, version, checkpointing, keeps
):
    assert keeps_training_cache(model_type, version, checkpointing) is keeps


@pytest.mark.parametrize(
    ("model_type", "version", "ignores"),
    [
        ("gpt_bigcode", "4.53.0", False),
        ("gpt_bigcode", "4.54.0", True),
        ("gpt_bigcode", "4.57.6", True),
        ("gpt_bigcode", "5.0.0", False),
        ("llama", "4.56.0", False),
        ("gpt_bigcode", None, False),
    ],
)
def test_gpt_bigcode_ran_without_checkpointing_from_4_54_until_5_0(model_type, version, ignores):
    assert ignores_checkpointing(model_type, version) is ignores
