"""Which library versions change an estimate, read from versions and requirements alike."""

import pytest

from diagnosis.libraries import (
    LATEST,
    Libraries,
    bitsandbytes_keeps_matmul_input,
    installed_version,
    loss_upcasts_logits,
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


@pytest.mark.parametrize(
    ("model_type", "version", "upcasts"),
    [
        ("gpt2", "4.48.0", False),
        ("gpt_bigcode", "4.45.2", False),
        ("gpt2", "4.49.0", True),
        ("stablelm", "4.45.2", False),
        ("stablelm", "4.46.0", True),
        ("llama", "4.40.0", True),  # upcast in forward long before the shared loss
        ("gpt2", None, True),  # unknown: current behaviour
        ("gpt2", LATEST, True),
    ],
)
def test_the_loss_upcasts_logits_from_the_release_that_moved_each_model_to_the_shared_loss(
    model_type, version, upcasts
):
    assert loss_upcasts_logits(model_type, version) is upcasts
    assert Libraries(transformers=version).loss_upcasts_logits(model_type) is upcasts


def test_named_versions_win_over_the_installed_ones():
    named = Libraries.that_run(bitsandbytes="0.42.0", transformers="4.45.2")
    assert named == Libraries(bitsandbytes="0.42.0", transformers="4.45.2")
    assert named.bnb_keeps_matmul_input and named.checkpoints_reentrantly
    assert Libraries.that_run().transformers == installed_version("transformers")
