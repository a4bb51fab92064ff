"""Named architectures the runner builds from a transformers config class with random weights.

Plain data (no transformers import) so the config validator can check LoRA targets and sequence
lengths before a process starts. Sizes are chosen so a step trains on two CPU cores in well under
a second while keeping every structural feature of the family (GQA, SwiGLU, tied embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A transformers config class name and the keyword arguments that make it small."""

    config_class: str
    config_kwargs: dict[str, Any]
    linear_module_names: tuple[str, ...]
    max_positions: int
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PRESETS: dict[str, Preset] = {
    "tiny-llama": Preset(
        config_class="LlamaConfig",
        config_kwargs=dict(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        ),
        linear_module_names=_LLAMA_LINEARS,
        max_positions=8192,
        description="Llama architecture (GQA, SwiGLU, RMSNorm), 2 layers, hidden 64",
    ),
    "tiny-qwen2": Preset(
        config_class="Qwen2Config",
        config_kwargs=dict(
            vocab_size=1536,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
        linear_module_names=_LLAMA_LINEARS,
        max_positions=8192,
        description="Qwen2 architecture (GQA, q/k/v bias, tied embeddings), 2 layers, hidden 64",
    ),
    "tiny-gpt2": Preset(
        config_class="GPT2Config",
        config_kwargs=dict(
            vocab_size=1024,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=2048,
        ),
        linear_module_names=("c_attn", "c_proj", "c_fc"),
        max_positions=2048,
        description="GPT-2 architecture (Conv1D projections, GELU MLP), 2 layers, hidden 64",
    ),
}
