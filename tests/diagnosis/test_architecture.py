"""Model shapes read from config.json dicts: each family's spelling, counts, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diagnosis.architecture import ArchitectureError, shape_for, shape_from_config_dict
from tests.conftest import REPO, subprocess_env

GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}


def test_estimator_modules_import_neither_torch_nor_transformers():
    # The estimate must answer in milliseconds, before any process with torch starts.
    code = (
        "import sys, diagnosis.architecture, diagnosis.analytic, diagnosis.fit, diagnosis.gpus, diagnosis.sharding; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_gpt2_spelling_and_defaults():
    shape = shape_from_config_dict(GPT2)
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.max_positions) == (768, 12, 12, 1024)
    assert shape.intermediate_size == 4 * 768  # n_inner absent → 4·n_embd
    assert shape.tied_embeddings and shape.learned_positions == 1024 and shape.rotary_dim == 0
    assert (shape.embedding_dropout, shape.residual_dropout, shape.attention_dropout) == (0.1, 0.1, 0.1)
    assert shape.parameter_count() == 124_439_808
    assert [linear.name for linear in shape.linear_layers()] == ["c_attn", "c_proj", "c_fc", "c_proj"]


def test_llama_components_add_up():
    shape = shape_for("llama-2-7b")
    h, i, v = 4096, 11008, 32000
    assert shape.embedding_parameters() == v * h
    assert shape.attention_parameters() == 4 * h * h
    assert shape.mlp_parameters() == 3 * h * i
    assert shape.layer_norm_parameters() == 2 * h
    assert shape.lm_head_parameters() == v * h
    assert shape.parameter_count() == 6_738_415_616
    assert shape.mlp == "swiglu" and shape.norm == "rmsnorm" and not shape.tied_embeddings


def test_qwen2_has_qkv_bias_but_no_output_bias():
    shape = shape_for("qwen2.5-7b")
    biases = {linear.name: linear.bias for linear in shape.linear_layers()}
    assert biases == {
        "q_proj": True,
        "k_proj": True,
        "v_proj": True,
        "o_proj": False,
        "gate_proj": False,
        "up_proj": False,
        "down_proj": False,
    }
    assert (shape.num_kv_heads, shape.head_dim) == (4, 128)


def test_gemma_head_dim_is_read_not_derived():
    shape = shape_for("gemma-7b")
    assert shape.head_dim == 256 != shape.hidden_size // shape.num_heads
    assert shape.mlp == "geglu" and shape.gated_mlp and shape.norm == "rmsnorm_gemma" and shape.tied_embeddings


def test_gemma2_reads_its_activation_key_and_softcaps():
    shape = shape_for("gemma-2-2b")
    assert shape.activation == "gelu_pytorch_tanh" and shape.norms_per_layer == 4
    assert shape.final_logit_softcap == 30.0 and shape.attn_logit_softcap == 50.0


def test_phi2_partial_rotary_parallel_block_and_head_bias():
    shape = shape_for("phi-2")
    assert shape.rotary_dim == 32  # 80-dim heads, partial_rotary_factor 0.4
    assert shape.parallel_block and shape.norms_per_layer == 1 and shape.lm_head_bias
    assert shape.residual_dropout == 0.1 and shape.activation == "gelu_new"


def test_phi3_fused_projections():
    shape = shape_for("phi-3-mini")
    sizes = {linear.name: (linear.d_in, linear.d_out) for linear in shape.linear_layers()}
    assert sizes == {
        "qkv_proj": (3072, 3 * 3072),
        "o_proj": (3072, 3072),
        "gate_up_proj": (3072, 2 * 8192),
        "down_proj": (8192, 3072),
    }


def test_missing_keys_are_named():
    with pytest.raises(
        ArchitectureError, match="llama decoder shape: config lacks hidden_size/n_embd/d_model.*num_hidden"
    ):
        shape_from_config_dict({"model_type": "llama", "vocab_size": 10})


def test_an_unknown_model_type_is_refused_not_guessed():
    # GPT-NeoX has every generic key, but a GELU MLP and parallel residuals: a Llama reading is wrong.
    neox = {
        "model_type": "gpt_neox",
        "vocab_size": 50688,
        "hidden_size": 4096,
        "intermediate_size": 16384,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
    }
    with pytest.raises(ArchitectureError, match=r"'gpt_neox' is not one .* \(gemma, .*gpt_bigcode, llama.*--traced"):
        shape_from_config_dict(neox)
    with pytest.raises(ArchitectureError, match="'\\(missing\\)'"):
        shape_from_config_dict({"vocab_size": 10})


def test_shape_for_reads_a_directory_and_a_file(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2))
    assert shape_for(str(tmp_path)).parameter_count() == 124_439_808
    assert shape_for(str(tmp_path / "config.json")).hidden_size == 768


def test_shape_for_refuses_what_it_cannot_read(tmp_path: Path):
    with pytest.raises(ArchitectureError, match="neither a preset"):
        shape_for("meta-llama/Llama-2-7b-hf")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ArchitectureError, match="does not hold a JSON object"):
        shape_for(str(tmp_path))


def test_gpt_bigcode_shares_one_key_value_head_unless_told_otherwise():
    santacoder = {
        "model_type": "gpt_bigcode",
        "vocab_size": 49280,
        "n_embd": 2048,
        "n_inner": 8192,
        "n_layer": 24,
        "n_head": 16,
        "n_positions": 2048,
    }
    shape = shape_from_config_dict(santacoder)
    assert (shape.num_kv_heads, shape.head_dim, shape.intermediate_size) == (1, 128, 8192)
    (c_attn, *_rest) = shape.linear_layers()
    assert (c_attn.name, c_attn.d_out) == ("c_attn", 2048 + 2 * 128)  # q for 16 heads, one k and one v
    # SantaCoder's published size: 1.1 B parameters.
    assert shape.parameter_count() == pytest.approx(1.12e9, rel=0.01)
    assert shape_from_config_dict({**santacoder, "multi_query": False}).num_kv_heads == 16
