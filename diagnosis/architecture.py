"""The shape of a decoder-only model, read from a config.json-style dict without transformers.

The analytic estimator needs only sizes (vocabulary, widths, heads, layers) and a few structural
facts (gated MLP, norm kind, biases, fused projections, dropout) to count parameters and
activations; importing transformers to get them would cost seconds. So this module reads the
config keys itself, in each family's spelling (`n_embd` for GPT-2, `hidden_activation` for Gemma 2,
`partial_rotary_factor` for Phi), with the defaults of the transformers 5.x config classes for keys
a config.json leaves out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.presets import PRESETS

# transformers config class (as a preset names it) → model_type.
_MODEL_TYPES = {
    "LlamaConfig": "llama",
    "MistralConfig": "mistral",
    "Qwen2Config": "qwen2",
    "GemmaConfig": "gemma",
    "Gemma2Config": "gemma2",
    "PhiConfig": "phi",
    "Phi3Config": "phi3",
    "GPT2Config": "gpt2",
}


class ArchitectureError(ValueError):
    """A model the estimator cannot read a shape from; the message names what is missing."""


@dataclass(frozen=True)
class LinearShape:
    """One linear projection of a decoder layer, by its module name (what LoRA targets)."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    # "attention" or "mlp": where the projection sits (gpt2 has a c_proj in each).
    block: str

    @property
    def parameters(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """Sizes and structure of a decoder-only transformer, as transformers builds it."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    # "swiglu" (silu-gated), "geglu" (gelu-gated, Gemma) or "gelu" (two-matrix MLP, GPT-2, Phi-2).
    mlp: str
    # transformers' activation name: the saved tensors differ (gelu_new is written out in Python).
    activation: str
    # "rmsnorm" (Llama: weight · x.to(dtype)), "rmsnorm_gemma" ((1 + weight) · x in fp32) or "layernorm".
    norm: str
    norms_per_layer: int
    tied_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    lm_head_bias: bool
    # Rows of a learned position table (GPT-2's wpe); 0 with rotary positions.
    learned_positions: int
    # Dimensions of each head that rotary embedding turns (Phi-2 turns 40%); 0 without RoPE.
    rotary_dim: int
    fused_qkv: bool  # one projection makes q, k and v (GPT-2 c_attn, Phi-3 qkv_proj)
    fused_gate_up: bool  # Phi-3 gate_up_proj
    parallel_block: bool  # attention and MLP read the same normed input (Phi-2)
    embedding_dropout: float
    residual_dropout: float
    attention_dropout: float
    embedding_scale: bool  # Gemma multiplies embeddings by sqrt(hidden)
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    # Phi and Phi-3 rotate a slice of each head and concatenate: q and k come out head-major.
    rotary_by_concat: bool = False

    # --- parameter counts ------------------------------------------------------------------
    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    def linear_layers(self) -> tuple[LinearShape, ...]:
        """The projections of one decoder layer, named as in transformers' modules."""
        h, i = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        names = _LINEAR_NAMES[self.model_type if self.model_type in _LINEAR_NAMES else "llama"]
        if self.fused_qkv:
            attention = [LinearShape(names["qkv"], h, q_out + 2 * kv_out, self.qkv_bias, "attention")]
        else:
            attention = [
                LinearShape(names["q"], h, q_out, self.qkv_bias, "attention"),
                LinearShape(names["k"], h, kv_out, self.qkv_bias, "attention"),
                LinearShape(names["v"], h, kv_out, self.qkv_bias, "attention"),
            ]
        attention.append(LinearShape(names["o"], q_out, h, self.o_bias, "attention"))
        if self.fused_gate_up:
            mlp = [LinearShape(names["gate_up"], h, 2 * i, self.mlp_bias, "mlp")]
        elif self.gated_mlp:
            mlp = [
                LinearShape(names["gate"], h, i, self.mlp_bias, "mlp"),
                LinearShape(names["up"], h, i, self.mlp_bias, "mlp"),
            ]
        else:
            mlp = [LinearShape(names["up"], h, i, self.mlp_bias, "mlp")]
        mlp.append(LinearShape(names["down"], i, h, self.mlp_bias, "mlp"))
        return (*attention, *mlp)

    def linear_module_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(linear.name for linear in self.linear_layers()))

    def embedding_parameters(self) -> int:
        return (self.vocab_size + self.learned_positions) * self.hidden_size

    def norm_size(self) -> int:
        """Parameters of one norm: weight, plus a bias for LayerNorm."""
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def attention_parameters(self) -> int:
        """Per layer."""
        return sum(linear.parameters for linear in self.linear_layers() if linear.block == "attention")

    def mlp_parameters(self) -> int:
        """Per layer."""
        return sum(linear.parameters for linear in self.linear_layers() if linear.block == "mlp")

    def layer_norm_parameters(self) -> int:
        """Per layer."""
        return self.norms_per_layer * self.norm_size()

    def layer_parameters(self) -> int:
        return self.attention_parameters() + self.mlp_parameters() + self.layer_norm_parameters()

    def final_norm_parameters(self) -> int:
        return self.norm_size()

    def lm_head_parameters(self) -> int:
        """0 when tied: the head reuses the embedding matrix."""
        if self.tied_embeddings:
            return self.vocab_size if self.lm_head_bias else 0
        return self.vocab_size * self.hidden_size + (self.vocab_size if self.lm_head_bias else 0)

    def parameter_count(self) -> int:
        return (
            self.embedding_parameters()
            + self.num_layers * self.layer_parameters()
            + self.final_norm_parameters()
            + self.lm_head_parameters()
        )

    def parameter_tensor_count(self) -> int:
        """How many parameter tensors (optimizers keep per-tensor scalars such as Adam's step)."""
        per_layer = sum(1 + linear.bias for linear in self.linear_layers())
        per_layer += self.norms_per_layer * (2 if self.norm == "layernorm" else 1)
        model = 1 + (self.learned_positions > 0) + (2 if self.norm == "layernorm" else 1)
        model += (not self.tied_embeddings) + self.lm_head_bias
        return self.num_layers * per_layer + model

    def largest_parameter(self) -> int:
        """Elements of the largest single parameter tensor (optimizers work tensor by tensor on CPU)."""
        return max(self.vocab_size * self.hidden_size, *(lin.d_in * lin.d_out for lin in self.linear_layers()))


# Module names per family: what `lora.target_modules` refers to.
_GPT2_NAMES = dict(qkv="c_attn", o="c_proj", up="c_fc", down="c_proj")
_LLAMA_NAMES = dict(q="q_proj", k="k_proj", v="v_proj", o="o_proj", gate="gate_proj", up="up_proj", down="down_proj")
_LINEAR_NAMES: dict[str, dict[str, str]] = {
    "llama": _LLAMA_NAMES,
    "gpt2": _GPT2_NAMES,
    "gpt_bigcode": _GPT2_NAMES,
    "phi": dict(q="q_proj", k="k_proj", v="v_proj", o="dense", up="fc1", down="fc2"),
    "phi3": dict(qkv="qkv_proj", o="o_proj", gate_up="gate_up_proj", down="down_proj"),
}

# Keys every family needs, in the generic spelling; aliases are tried in order.
_ALIASES: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "n_ctx"),
    "hidden_act": ("hidden_activation", "hidden_act", "activation_function"),
}

# GPT-2: learned positions, Conv1D projections with biases, dropout 0.1 everywhere by default.
_GPT2: dict[str, Any] = dict(
    tie_word_embeddings=True,
    hidden_act="gelu_new",
    max_position_embeddings=1024,
    norm="layernorm",
    mlp="gelu",
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    fused_qkv=True,
    learned_positions=True,
    rotary=False,
    resid_pdrop=0.1,
    embd_pdrop=0.1,
    attn_pdrop=0.1,
)

# Defaults of the transformers 5.x config classes for keys a config.json may leave out, and the
# structure each family's modeling file hard-codes (biases, norm kind, fused projections).
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=2048,
        attention_bias=False,
        mlp_bias=False,
        norm="rmsnorm",
        mlp="swiglu",
    ),
    "mistral": dict(
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=131072,
        norm="rmsnorm",
        mlp="swiglu",
    ),
    # Qwen2's q/k/v projections always carry a bias (modeling_qwen2.Qwen2Attention).
    "qwen2": dict(
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=32768,
        norm="rmsnorm",
        mlp="swiglu",
        qkv_bias=True,
    ),
    "gemma": dict(
        tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        head_dim=256,
        norm="rmsnorm_gemma",
        mlp="geglu",
        embedding_scale=True,
    ),
    "gemma2": dict(
        tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        head_dim=256,
        norm="rmsnorm_gemma",
        mlp="geglu",
        embedding_scale=True,
        norms_per_layer=4,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    # Phi-2: one LayerNorm feeds attention and MLP in parallel; every projection and the head have a bias.
    "phi": dict(
        tie_word_embeddings=False,
        hidden_act="gelu_new",
        max_position_embeddings=2048,
        norm="layernorm",
        mlp="gelu",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        parallel_block=True,
        norms_per_layer=1,
        partial_rotary_factor=0.5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        rotary_by_concat=True,
    ),
    "phi3": dict(
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=4096,
        norm="rmsnorm",
        mlp="swiglu",
        fused_qkv=True,
        fused_gate_up=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        rotary_by_concat=True,
    ),
    "gpt2": _GPT2,
    # GPTBigCode (SantaCoder, StarCoder): GPT-2's block with nn.Linear projections, one shared
    # key/value head (multi_query, the default) and the tanh GELU as one op.
    "gpt_bigcode": {**_GPT2, "hidden_act": "gelu_pytorch_tanh", "multi_query": True},
}
# Families whose MLP width may be left out of config.json (n_inner: None means 4 × hidden).
_MLP_WIDTH_OPTIONAL = ("gpt2", "gpt_bigcode")
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _lookup(raw: dict[str, Any], key: str) -> Any:
    for alias in _ALIASES.get(key, (key,)):
        if raw.get(alias) is not None:
            return raw[alias]
    return None


def _dropout(raw: dict[str, Any], family: dict[str, Any], *keys: str) -> float:
    for key in keys:
        if raw.get(key) is not None:
            return float(raw[key])
        if family.get(key) is not None:
            return float(family[key])
    return 0.0


def _rotary_factor(raw: dict[str, Any], family: dict[str, Any]) -> float:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    for source in (raw, rope if isinstance(rope, dict) else {}, family):
        if source.get("partial_rotary_factor") is not None:
            return float(source["partial_rotary_factor"])
    return 1.0


def shape_from_config_dict(raw: dict[str, Any]) -> ModelShape:
    """Read a ModelShape from a config.json-style dict (any of the known families' spellings)."""
    model_type = str(raw.get("model_type") or "")
    if model_type not in _FAMILIES:
        # Reading another family as a Llama would count the wrong MLP, norms and attention: a
        # plausible wrong number is worse than none. Llama derivatives declare model_type "llama".
        raise ArchitectureError(
            f"model_type {model_type or '(missing)'!r} is not one the analytic estimator models "
            f"({', '.join(sorted(_FAMILIES))}); use the traced estimator (python -m diagnosis estimate --traced)"
        )
    family = _FAMILIES[model_type]
    needed = _REQUIRED + (("intermediate_size",) if model_type not in _MLP_WIDTH_OPTIONAL else ())
    missing = [key for key in needed if _lookup(raw, key) is None]
    if missing:
        spelled = ", ".join("/".join(_ALIASES.get(key, (key,))) for key in missing)
        raise ArchitectureError(f"cannot read a {model_type} decoder shape: config lacks {spelled}")

    def get(key: str, default: Any = None) -> Any:
        value = _lookup(raw, key)
        return value if value is not None else family.get(key, default)

    hidden = int(get("hidden_size"))
    heads = int(get("num_attention_heads"))
    head_dim = int(get("head_dim") or hidden // heads)
    intermediate = get("intermediate_size")
    gated = family["mlp"] != "gelu"
    return ModelShape(
        model_type=model_type,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(intermediate) if intermediate is not None else 4 * hidden,
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=1 if get("multi_query") else int(get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_positions=int(get("max_position_embeddings")),
        mlp=family["mlp"],
        activation=str(get("hidden_act")),
        norm=family["norm"],
        norms_per_layer=int(family.get("norms_per_layer", 2)),
        tied_embeddings=bool(get("tie_word_embeddings")),
        qkv_bias=bool(raw.get("attention_bias") or family.get("qkv_bias") or family.get("attention_bias")),
        o_bias=bool(raw.get("attention_bias") or family.get("o_bias") or family.get("attention_bias")),
        mlp_bias=bool(raw.get("mlp_bias") or family.get("mlp_bias")) if gated else bool(family.get("mlp_bias", True)),
        lm_head_bias=bool(family.get("lm_head_bias", False)),
        learned_positions=int(get("max_position_embeddings")) if family.get("learned_positions") else 0,
        rotary_dim=0 if family.get("rotary") is False else int(head_dim * _rotary_factor(raw, family)),
        fused_qkv=bool(family.get("fused_qkv", False)),
        fused_gate_up=bool(family.get("fused_gate_up", False)),
        parallel_block=bool(family.get("parallel_block", False)),
        embedding_dropout=_dropout(raw, family, "embd_pdrop"),
        residual_dropout=_dropout(raw, family, "resid_pdrop"),
        attention_dropout=_dropout(raw, family, "attn_pdrop", "attention_dropout"),
        embedding_scale=bool(family.get("embedding_scale", False)),
        final_logit_softcap=get("final_logit_softcapping"),
        attn_logit_softcap=get("attn_logit_softcapping"),
        rotary_by_concat=bool(family.get("rotary_by_concat", False)),
    )


def preset_config_dict(name: str) -> dict[str, Any]:
    """A preset as the config.json transformers would write for it."""
    preset = PRESETS[name]
    return {"model_type": _MODEL_TYPES[preset.config_class], **preset.config_kwargs}


def shape_for(model_name: str) -> ModelShape:
    """The shape of a preset, a directory holding config.json, or a config.json file."""
    if model_name in PRESETS:
        return shape_from_config_dict(preset_config_dict(model_name))
    path = Path(model_name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ArchitectureError(
            f"{model_name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory or config.json; "
            "for a hub id, download its config.json and give its path"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ArchitectureError(f"{str(path)!r} is not a readable config.json: {error}") from error
    if not isinstance(raw, dict):
        raise ArchitectureError(f"{str(path)!r} does not hold a JSON object")
    return shape_from_config_dict(raw)
