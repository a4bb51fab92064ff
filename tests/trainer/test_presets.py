"""The presets build the architectures they name: parameter counts match the published ones.

Models are built on the meta device (shapes only, no weights), so the 70B presets cost as little
as the tiny ones.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from diagnosis.architecture import shape_for
from trainer.models import hf_config
from trainer.presets import PRESETS

# Parameter counts as the hub repos publish them (safetensors metadata on the model pages).
PUBLISHED = {
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.0e9,
    "llama-2-70b": 69.0e9,
    "llama-3-8b": 8.03e9,
    "llama-3-70b": 70.6e9,
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "tinyllama-1.1b": 1.10e9,
    "mistral-7b": 7.24e9,
    "qwen2-7b": 7.62e9,
    "qwen2.5-0.5b": 0.494e9,
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-14b": 14.8e9,
    "qwen2.5-32b": 32.8e9,
    "yi-34b": 34.4e9,
    "gemma-2b": 2.51e9,
    "gemma-7b": 8.54e9,
    "gemma-2-2b": 2.61e9,
    "phi-2": 2.78e9,
    "phi-3-mini": 3.82e9,
    "gpt2": 124e6,
    "gpt2-medium": 355e6,
    "gpt2-large": 774e6,
    "gpt2-xl": 1.56e9,
}
TINY = {"tiny-llama", "tiny-qwen2", "tiny-gpt2"}


@functools.cache
def meta_parameter_count(name: str) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(name))
    return sum(parameter.numel() for parameter in model.parameters())


def test_every_published_preset_has_a_published_count():
    assert set(PRESETS) - TINY == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_the_published_one(name: str):
    count = meta_parameter_count(name)
    assert count == pytest.approx(PUBLISHED[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_estimator_counts_what_transformers_builds(name: str):
    # diagnosis.architecture reads the same config without transformers; it must agree exactly.
    assert shape_for(name).parameter_count() == meta_parameter_count(name)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_lora_targets_and_positions_match_the_architecture(name: str):
    preset, shape = PRESETS[name], shape_for(name)
    assert set(preset.linear_module_names) == set(shape.linear_module_names())
    assert preset.max_positions == shape.max_positions


def test_tiny_presets_keep_their_sizes():
    # The runner's tests train these on two CPU cores; growing them slows every test.
    assert PRESETS["tiny-llama"].config_kwargs["hidden_size"] == 64
    assert PRESETS["tiny-qwen2"].config_kwargs["tie_word_embeddings"] is True
    assert PRESETS["tiny-gpt2"].config_kwargs == dict(vocab_size=1024, n_embd=64, n_layer=2, n_head=4, n_positions=2048)
