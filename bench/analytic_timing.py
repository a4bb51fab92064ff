"""Wall time of one analytic estimate (issue #4 target: under 50 ms), over configs from tiny to 70B.

.venv/bin/python -m bench.analytic_timing [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

from diagnosis.analytic import estimate_analytic
from diagnosis.units import human_bytes
from trainer.config import validate_config

CONFIGS = {
    "tiny-llama LoRA, 256 tokens": {"model": {"name": "tiny-llama"}},
    "llama-2-7b LoRA r16 q/v, 4k, eager": {
        "model": {"name": "llama-2-7b", "dtype": "bf16", "attn_implementation": "eager"},
        "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"seq_len": 4096},
    },
    "qwen2.5-7b QLoRA nf4, 8k, checkpointing": {
        "model": {"name": "qwen2.5-7b", "dtype": "bf16", "quantization": "nf4", "gradient_checkpointing": True},
        "data": {"seq_len": 8192},
    },
    "llama-3-70b full, ZeRO-3 x8, offload": {
        "model": {"name": "llama-3-70b", "dtype": "bf16", "gradient_checkpointing": True},
        "lora": None,
        "train": {"num_gpus": 8},
        "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu"},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    print("| config | peak allocated | median ms | max ms |")
    print("|---|---|---|---|")
    for name, raw in CONFIGS.items():
        cfg = validate_config(raw)
        estimate_analytic(cfg)  # first call: imports and caches
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            estimate = estimate_analytic(cfg)
            times.append((time.perf_counter() - started) * 1e3)
        peak = human_bytes(estimate.peak_allocated_bytes)
        print(f"| {name} | {peak} | {statistics.median(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()
