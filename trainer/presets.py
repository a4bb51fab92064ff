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


# --- Published architectures, random weights --------------------------------------------------
# Each copies the architecture keys of the hub repo's config.json named in its comment, so that an
# estimate (and a runner on a large enough machine) sees the real shapes. Token ids, dtypes and
# initialisation settings are left at the config class defaults: they change no memory.

_PHI_LINEARS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
_PHI3_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_GPT2_LINEARS = ("c_attn", "c_proj", "c_fc")


def _published(config_class: str, linears: tuple[str, ...], description: str, **config_kwargs: Any) -> Preset:
    positions = config_kwargs.get("max_position_embeddings") or config_kwargs["n_positions"]
    return Preset(config_class, config_kwargs, linears, positions, description)


def _llama(description: str, **config_kwargs: Any) -> Preset:
    return _published("LlamaConfig", _LLAMA_LINEARS, description, hidden_act="silu", **config_kwargs)


def _qwen2(description: str, **config_kwargs: Any) -> Preset:
    return _published(
        "Qwen2Config", _LLAMA_LINEARS, description, hidden_act="silu", rope_theta=1_000_000.0, **config_kwargs
    )


def _gpt2(description: str, **config_kwargs: Any) -> Preset:
    return _published(
        "GPT2Config",
        _GPT2_LINEARS,
        description,
        vocab_size=50257,
        n_positions=1024,
        activation_function="gelu_new",
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        layer_norm_epsilon=1e-5,
        **config_kwargs,
    )


_LLAMA3_ROPE = dict(
    rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0, original_max_position_embeddings=8192
)

PRESETS.update(
    {
        # meta-llama/Llama-2-7b-hf
        "llama-2-7b": _llama(
            "Llama 2 7B (6.74B parameters)",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
        # meta-llama/Llama-2-13b-hf
        "llama-2-13b": _llama(
            "Llama 2 13B (13.0B parameters)",
            vocab_size=32000,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
        # meta-llama/Llama-2-70b-hf
        "llama-2-70b": _llama(
            "Llama 2 70B (69.0B parameters, GQA 8 KV heads)",
            vocab_size=32000,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
        # meta-llama/Meta-Llama-3-8B
        "llama-3-8b": _llama(
            "Llama 3 8B (8.03B parameters, 128k vocabulary)",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
        # meta-llama/Meta-Llama-3-70B
        "llama-3-70b": _llama(
            "Llama 3 70B (70.6B parameters)",
            vocab_size=128256,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
        # meta-llama/Llama-3.2-1B
        "llama-3.2-1b": _llama(
            "Llama 3.2 1B (1.24B parameters, tied embeddings)",
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=dict(_LLAMA3_ROPE),
            tie_word_embeddings=True,
        ),
        # meta-llama/Llama-3.2-3B
        "llama-3.2-3b": _llama(
            "Llama 3.2 3B (3.21B parameters, tied embeddings)",
            vocab_size=128256,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=dict(_LLAMA3_ROPE),
            tie_word_embeddings=True,
        ),
        # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
        "tinyllama-1.1b": _llama(
            "TinyLlama 1.1B (Llama 2 architecture, 22 layers, GQA 4 KV heads)",
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
        # mistralai/Mistral-7B-v0.1
        "mistral-7b": _published(
            "MistralConfig",
            _LLAMA_LINEARS,
            "Mistral 7B v0.1 (7.24B parameters, sliding window 4096)",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            hidden_act="silu",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=4096,
            tie_word_embeddings=False,
        ),
        # Qwen/Qwen2-7B
        "qwen2-7b": _qwen2(
            "Qwen2 7B (7.62B parameters, 152k vocabulary)",
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        # Qwen/Qwen2.5-0.5B
        "qwen2.5-0.5b": _qwen2(
            "Qwen2.5 0.5B (0.49B parameters, tied embeddings)",
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        # Qwen/Qwen2.5-1.5B
        "qwen2.5-1.5b": _qwen2(
            "Qwen2.5 1.5B (1.54B parameters, tied embeddings)",
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        # Qwen/Qwen2.5-7B
        "qwen2.5-7b": _qwen2(
            "Qwen2.5 7B (7.62B parameters, 152k vocabulary)",
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        # Qwen/Qwen2.5-14B
        "qwen2.5-14b": _qwen2(
            "Qwen2.5 14B (14.8B parameters)",
            vocab_size=152064,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=48,
            num_attention_heads=40,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        # Qwen/Qwen2.5-32B
        "qwen2.5-32b": _qwen2(
            "Qwen2.5 32B (32.8B parameters)",
            vocab_size=152064,
            hidden_size=5120,
            intermediate_size=27648,
            num_hidden_layers=64,
            num_attention_heads=40,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        # 01-ai/Yi-34B: a Llama architecture (scenario 5's "34B model of another family")
        "yi-34b": _llama(
            "Yi 34B (34.4B parameters, 64k vocabulary, GQA 56/8)",
            vocab_size=64000,
            hidden_size=7168,
            intermediate_size=20480,
            num_hidden_layers=60,
            num_attention_heads=56,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_theta=5_000_000.0,
            tie_word_embeddings=False,
        ),
        # google/gemma-2b
        "gemma-2b": _published(
            "GemmaConfig",
            _LLAMA_LINEARS,
            "Gemma 2B (2.51B parameters, 256k vocabulary, MQA)",
            vocab_size=256000,
            hidden_size=2048,
            intermediate_size=16384,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            max_position_embeddings=8192,
            hidden_act="gelu",
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
        # google/gemma-7b
        "gemma-7b": _published(
            "GemmaConfig",
            _LLAMA_LINEARS,
            "Gemma 7B (8.54B parameters, 256k vocabulary)",
            vocab_size=256000,
            hidden_size=3072,
            intermediate_size=24576,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=16,
            head_dim=256,
            max_position_embeddings=8192,
            hidden_act="gelu",
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
        # google/gemma-2-2b
        "gemma-2-2b": _published(
            "Gemma2Config",
            _LLAMA_LINEARS,
            "Gemma 2 2B (2.61B parameters, logit soft-capping)",
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            max_position_embeddings=8192,
            hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            sliding_window=4096,
            query_pre_attn_scalar=256,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            tie_word_embeddings=True,
        ),
        # microsoft/phi-2
        "phi-2": _published(
            "PhiConfig",
            _PHI_LINEARS,
            "Phi-2 (2.78B parameters, parallel block, partial rotary)",
            vocab_size=51200,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=2048,
            hidden_act="gelu_new",
            partial_rotary_factor=0.4,
            layer_norm_eps=1e-5,
            resid_pdrop=0.1,
            embd_pdrop=0.0,
            attention_dropout=0.0,
            rope_theta=10000.0,
            qk_layernorm=False,
            tie_word_embeddings=False,
        ),
        # microsoft/Phi-3-mini-4k-instruct
        "phi-3-mini": _published(
            "Phi3Config",
            _PHI3_LINEARS,
            "Phi-3 mini 4k (3.82B parameters, fused qkv and gate/up)",
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            hidden_act="silu",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=2047,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
            pad_token_id=32000,
            bos_token_id=1,
            eos_token_id=32000,
            tie_word_embeddings=False,
        ),
        # openai-community/gpt2
        "gpt2": _gpt2("GPT-2 small (124M parameters)", n_embd=768, n_layer=12, n_head=12),
        # openai-community/gpt2-medium
        "gpt2-medium": _gpt2("GPT-2 medium (355M parameters)", n_embd=1024, n_layer=24, n_head=16),
        # openai-community/gpt2-large
        "gpt2-large": _gpt2("GPT-2 large (774M parameters)", n_embd=1280, n_layer=36, n_head=20),
        # openai-community/gpt2-xl
        "gpt2-xl": _gpt2("GPT-2 XL (1.56B parameters)", n_embd=1600, n_layer=48, n_head=25),
    }
)
