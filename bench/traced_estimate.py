"""How long the traced estimator takes on a 7B model, and that it allocates no weights.

Traces Llama-2-7B shapes (a config.json with the hub repo's architecture keys, random weights
never made) in the settings issue #4 names, one after another in one process, and prints per
config: seconds, peak allocated, the breakdown at the peak, and the process's peak RSS so far
(real bf16 weights alone would be 12.6 GiB). The first row also pays transformers' and peft's
lazy imports, as a user's first estimate does. CPU seconds (all threads) show the cost when the
machine is shared and wall time is not the estimator's own.

    .venv/bin/python -m bench.traced_estimate [--layers 32] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from diagnosis.estimate import BREAKDOWN_KEYS
from diagnosis.traced import estimate_traced
from diagnosis.units import human_bytes
from trainer.config import validate_config
from trainer.presets import PRESETS

# The llama-2-7b preset (meta-llama/Llama-2-7b-hf's architecture) as a config.json, so --layers can cut it.
LLAMA_2_7B = dict(model_type="llama", **PRESETS["llama-2-7b"].config_kwargs)
LORA_QV = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}

CONFIGS = {
    "LoRA r16 q/v, sdpa, bf16": {},
    "LoRA r16 q/v, sdpa, bf16, checkpointing": {"model": {"gradient_checkpointing": True}},
    "LoRA r16 q/v, eager, bf16": {"model": {"attn_implementation": "eager"}},
    "full fine-tune, AdamW, sdpa, bf16, checkpointing": {"model": {"gradient_checkpointing": True}, "lora": None},
}


def run_config(config_json: Path, seq_len: int, overrides: dict) -> dict:
    raw = {
        "model": {"name": str(config_json), "dtype": "bf16", "attn_implementation": "sdpa"},
        "lora": LORA_QV,
        "data": {"seq_len": seq_len},
        "train": {"micro_batch_size": 1},
    }
    for section, values in overrides.items():
        raw[section] = None if values is None else {**(raw.get(section) or {}), **values}
    cfg = validate_config(raw)
    started, cpu_started = time.perf_counter(), time.process_time()
    estimate = estimate_traced(cfg, device="cuda")
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "estimate": estimate,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama-2-7B shapes, {args.layers} layers,")
    print(f"micro-batch 1, seq {args.seq_len}, device=cuda (512-byte blocks)")
    print(f"| config | seconds | CPU seconds | peak allocated | peak phase | {' | '.join(BREAKDOWN_KEYS)} | max RSS |")
    print("|---" * (6 + len(BREAKDOWN_KEYS)) + "|")
    with tempfile.TemporaryDirectory() as workdir:
        config_json = Path(workdir) / "config.json"
        config_json.write_text(json.dumps(dict(LLAMA_2_7B, num_hidden_layers=args.layers)))
        for name, overrides in CONFIGS.items():
            result = run_config(config_json, args.seq_len, overrides)
            estimate = result["estimate"]
            parts = " | ".join(human_bytes(estimate.breakdown[key]) for key in BREAKDOWN_KEYS)
            print(
                f"| {name} | {result['seconds']:.1f} | {result['cpu_seconds']:.1f} | "
                f"{human_bytes(estimate.peak_allocated_bytes)} | "
                f"{estimate.peak_phase} | {parts} | {human_bytes(result['max_rss_bytes'])} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
