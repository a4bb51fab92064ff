"""Per-step cost of the collector: step time with it vs without, side by side in one process.

Blocks of steps alternate between the full collector (StepMonitor: activation hooks, tensor
breakdown, host probe, allocator probe on CUDA, samples through the sink into a real SQLite file)
and a monitor that does nothing, on the same model, optimizer and data stream, so drift in the
machine's speed hits both alike. Reports the ratio of median block times.

    .venv/bin/python -m bench.collector_overhead [--seq-len 256] [--blocks 20] [--block-steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from collector.sink import RecordSink
from db import open_engine
from db.writes import create_run, write_records
from trainer.config import validate_config
from trainer.loop import make_monitor, resolve_device, setup, train


class NullMonitor:
    """The loop's monitor interface, doing nothing: the baseline."""

    def begin_step(self, step: int) -> None: ...

    def enter(self, phase: str, micro_batch: int | None = None) -> None: ...

    def set_batch(self, batch_size: int, seq_len: int) -> None: ...

    def forward(self):
        return nullcontext()

    def after_backward(self) -> None: ...

    def end_step(self, *args) -> None: ...


def measure(seq_len: int, blocks: int, block_steps: int, device: str) -> dict:
    cfg = validate_config({"data": {"seq_len": seq_len}, "train": {"max_steps": block_steps, "device": device}})
    training = setup(cfg, resolve_device(cfg.train.device))
    with tempfile.TemporaryDirectory() as workspace:
        engine = open_engine(f"sqlite:///{Path(workspace) / 'bench.db'}")
        run_id = create_run(engine, cfg.to_dict())
        sink = RecordSink(partial(write_records, engine, run_id))
        monitor = make_monitor(cfg, training, sink.put)
        null = NullMonitor()
        steps = iter(range(1, 10**9, block_steps))  # step numbers stay unique across blocks
        train(training, monitor, next(steps))  # warm-up: optimizer state, allocator caches, lazy imports
        train(training, null)
        times: dict[str, list[float]] = {"with": [], "without": []}
        for block in range(blocks):
            # Alternate which goes first so neither always follows the other.
            order = [("with", monitor), ("without", null)]
            if block % 2:
                order.reverse()
            for label, active in order:
                if training.device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                train(training, active, next(steps))
                if training.device.type == "cuda":
                    torch.cuda.synchronize()
                times[label].append((time.perf_counter() - started) / block_steps)
        monitor.close()
        sink.close()
    with_ms = statistics.median(times["with"]) * 1e3
    without_ms = statistics.median(times["without"]) * 1e3
    return {
        "device": str(training.device),
        "seq_len": seq_len,
        "step_ms_with": with_ms,
        "step_ms_without": without_ms,
        "overhead_pct": (with_ms / without_ms - 1) * 100,
        "steps_each": blocks * block_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| device | seq_len | step ms without | step ms with | overhead | steps each |")
    print("|---|---|---|---|---|---|")
    for seq_len in args.seq_len:
        r = measure(seq_len, args.blocks, args.block_steps, args.device)
        print(
            f"| {r['device']} | {r['seq_len']} | {r['step_ms_without']:.2f} | {r['step_ms_with']:.2f} "
            f"| {r['overhead_pct']:+.2f}% | {r['steps_each']} |"
        )


if __name__ == "__main__":
    main()
