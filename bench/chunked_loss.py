"""What `train.loss_chunk_tokens` saves and costs, measured on the runner's real step.

Part 1, measured: small decoders (Qwen2 shape, hidden 64, two layers) under real vocabulary sizes,
where the logits set the peak, trained by the runner's own loop with and without chunks, side by
side in one process. Per config: the real peak of the second step (on the CPU the allocator's own
running total, bench.cpu_allocator; on CUDA torch.cuda.max_memory_allocated), the analytic and
traced estimates of it, and the median step time.

Part 2, estimated: real models at 2 × 4,096 tokens on an 80 GB card, the analytic what-if that
`python -m diagnosis suggest` quotes.

    .venv/bin/python -m bench.chunked_loss [--device cpu|cuda] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import transformers

from bench.cpu_allocator import cpu_allocator_peak
from diagnosis.analytic import estimate_analytic
from diagnosis.traced import estimate_traced
from diagnosis.units import human_bytes
from trainer.config import RunConfig, validate_config
from trainer.loop import setup, train

VOCABULARIES = {"Llama 2 (32,000)": 32_000, "Qwen2.5 (152,064)": 152_064}
CHUNKS = (0, 1024, 256)
REAL_MODELS = {
    "Qwen2.5-7B LoRA q/k/v/o, checkpointing": {"model": {"name": "qwen2.5-7b", "gradient_checkpointing": True}},
    "Llama-3-8B LoRA q/k/v/o, checkpointing": {"model": {"name": "llama-3-8b", "gradient_checkpointing": True}},
    "Llama-3.2-1B full, AdamW": {"model": {"name": "llama-3.2-1b"}, "lora": None},
    "Gemma-2-2B LoRA q/k/v/o (eager, soft-capped logits)": {
        "model": {"name": "gemma-2-2b", "attn_implementation": "eager"}
    },
}


class _Timer:
    """The loop's monitor interface, timing each step and nothing else (no collector)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin_step(self, step: int) -> None:
        self._sync()
        self._start = time.perf_counter()
        if step == 2 and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def end_step(self, step: int, *_args) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)

    def enter(self, *_args, **_kwargs) -> None: ...

    def set_batch(self, *_args) -> None: ...

    def forward(self):
        return nullcontext()

    def after_backward(self) -> None: ...


def _small_decoder(folder: str, vocab: int) -> str:
    transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ).save_pretrained(folder)
    return folder


def _timed(cfg: RunConfig, device: torch.device) -> tuple[float, int | None]:
    """Median step seconds after the first, and on CUDA the peak of the steps after the first."""
    training = setup(cfg, device)
    timer = _Timer(device)
    train(training, timer)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(timer.seconds[1:]), peak


def measured(device: torch.device, steps: int) -> None:
    print(f"## Measured: the runner's step, {device.type}, 2 × 1,024 tokens, full fine-tune fp32, hidden 64\n")
    print("| vocabulary | loss_chunk_tokens | real peak | analytic | traced | step (median) |")
    print("|---|---|---|---|---|---|")
    for label, vocab in VOCABULARIES.items():
        with tempfile.TemporaryDirectory() as folder:
            name = _small_decoder(folder, vocab)
            base_time = None
            for chunk in CHUNKS:
                raw = {
                    "model": {"name": name},
                    "lora": None,
                    "data": {"seq_len": 1024},
                    "train": {"micro_batch_size": 2, "max_steps": steps, "device": device.type},
                }
                raw["train"]["loss_chunk_tokens"] = chunk
                cfg = validate_config(raw)
                seconds, cuda_peak = _timed(cfg, device)
                real = (
                    cuda_peak
                    if cuda_peak is not None
                    else cpu_allocator_peak(validate_config({**raw, "train": {**raw["train"], "max_steps": 2}}))
                )
                estimate_device = "cuda" if device.type == "cuda" else "cpu"
                analytic = estimate_analytic(cfg, device=estimate_device).peak_allocated_bytes
                traced = estimate_traced(cfg, device=estimate_device).peak_allocated_bytes
                base_time = base_time or seconds
                print(
                    f"| {label} | {chunk or 'off'} | {human_bytes(real)} | {human_bytes(analytic)} "
                    f"({(analytic - real) / real:+.1%}) | {human_bytes(traced)} ({(traced - real) / real:+.1%}) "
                    f"| {seconds * 1000:.0f} ms ({seconds / base_time:.2f}×) |"
                )
    print()


def estimated() -> None:
    print("## Estimated: 2 × 4,096 tokens, bf16 weights, sdpa unless named, H100 80GB (analytic what-if)\n")
    print("| model | peak, loss at once | peak, 1,024-token chunks | saves | logits and loss at once |")
    print("|---|---|---|---|---|")
    for label, sections in REAL_MODELS.items():
        raw = {
            "model": {"dtype": "bf16", **sections["model"]},
            "lora": sections.get(
                "lora", {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
            ),
            "data": {"seq_len": 4096},
            "train": {"micro_batch_size": 2},
        }
        plain = estimate_analytic(validate_config(raw), gpu="H100 80GB")
        chunked = estimate_analytic(
            validate_config({**raw, "train": {**raw["train"], "loss_chunk_tokens": 1024}}), gpu="H100 80GB"
        )
        saves = plain.device_bytes - chunked.device_bytes
        print(
            f"| {label} | {human_bytes(plain.peak_allocated_bytes)} | {human_bytes(chunked.peak_allocated_bytes)} "
            f"| {human_bytes(saves)} (device) | {human_bytes(plain.totals['logits_loss'])} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # two shared cores: one thread measures steadier
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    measured(torch.device(args.device), args.steps)
    estimated()


if __name__ == "__main__":
    main()
