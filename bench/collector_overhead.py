"""Per-step cost of the collector: step time with it vs without, side by side in one process.

Blocks of steps rotate between a monitor that does nothing and collector variants, on the same
model, optimizer and data stream, so drift in the machine's speed hits all alike:
  default       what a run gets by default: activation hooks, tensor breakdown, host probe,
                allocator probe on CUDA, module tracking, layer profile on steps 1-2 and every
                50th, samples through the sink into a real SQLite file;
  no_modules    the same without module tracking (and so without layer profiles);
  profile_all   a layer profile on every step: the cost of one profiled step.
Reports each variant's median block time against the baseline's.

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


VARIANTS = {
    "default": {},
    "no_modules": {"track_modules": False},
    "profile_all": {"layer_profile_every": 1},
}


def measure(seq_len: int, blocks: int, block_steps: int, device: str) -> dict:
    cfg = validate_config({"data": {"seq_len": seq_len}, "train": {"max_steps": block_steps, "device": device}})
    training = setup(cfg, resolve_device(cfg.train.device))
    times: dict[str, list[float]] = {"baseline": [], **{name: [] for name in VARIANTS}}
    # Process CPU time too (every thread, the sink's included): steadier than wall time when other
    # work shares the machine, and it still charges the collector for all the work it adds.
    cpu_times: dict[str, list[float]] = {name: [] for name in times}
    with tempfile.TemporaryDirectory() as workspace:
        engine = open_engine(f"sqlite:///{Path(workspace) / 'bench.db'}")
        sinks, monitors = [], {"baseline": NullMonitor()}
        for name, monitor_settings in VARIANTS.items():
            variant_cfg = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update=monitor_settings)})
            sink = RecordSink(partial(write_records, engine, create_run(engine, variant_cfg.to_dict())))
            sinks.append(sink)
            monitors[name] = make_monitor(variant_cfg, training, sink.put)
        # Module hooks stay registered on the model once a monitor tracks modules, so each
        # variant's own hooks run for the others too; detach them outside their own blocks.
        for name, monitor in monitors.items():
            if name != "baseline":
                monitor.where.remove()
        steps = iter(range(1, 10**9, block_steps))  # step numbers stay unique across blocks
        order = list(monitors)
        for block in range(blocks + 1):  # block 0 is warm-up: optimizer state, lazy imports
            order = order[1:] + order[:1]  # rotate so no variant always follows another
            for name in order:
                monitor = monitors[name]
                tracked = name != "baseline" and VARIANTS[name].get("track_modules", True)
                if tracked:
                    monitor.where.track_modules(training.built.model)
                if training.device.type == "cuda":
                    torch.cuda.synchronize()
                started, cpu_started = time.perf_counter(), time.process_time()
                train(training, monitor, next(steps))
                if training.device.type == "cuda":
                    torch.cuda.synchronize()
                if block:
                    times[name].append((time.perf_counter() - started) / block_steps)
                    cpu_times[name].append((time.process_time() - cpu_started) / block_steps)
                if tracked:
                    monitor.where.remove()
        for name, monitor in monitors.items():
            if name != "baseline":
                monitor.close()
        for sink in sinks:
            sink.close()
    baseline_ms = statistics.median(times["baseline"]) * 1e3
    baseline_cpu_ms = statistics.median(cpu_times["baseline"]) * 1e3
    result = {
        "device": str(training.device),
        "seq_len": seq_len,
        "baseline_ms": baseline_ms,
        "baseline_cpu_ms": baseline_cpu_ms,
        "steps_each": blocks * block_steps,
    }
    for name in VARIANTS:
        ms = statistics.median(times[name]) * 1e3
        result[name] = (ms, (ms / baseline_ms - 1) * 100)
        cpu_ms = statistics.median(cpu_times[name]) * 1e3
        result[f"{name}_cpu"] = (cpu_ms, (cpu_ms / baseline_cpu_ms - 1) * 100)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    columns = " | ".join(f"{name} ms (ratio)" for name in VARIANTS)
    print(f"| device | seq_len | no collector ms | {columns} | steps each |")
    print("|---" * (4 + len(VARIANTS)) + "|")
    for seq_len in args.seq_len:
        r = measure(seq_len, args.blocks, args.block_steps, args.device)
        cells = " | ".join(f"{r[name][0]:.2f} ({r[name][1]:+.1f}%)" for name in VARIANTS)
        print(f"| {r['device']} | {r['seq_len']} | {r['baseline_ms']:.2f} | {cells} | {r['steps_each']} |")
        cpu_cells = " | ".join(f"{r[name + '_cpu'][0]:.2f} ({r[name + '_cpu'][1]:+.1f}%)" for name in VARIANTS)
        cpu_row = f"| {r['device']} CPU time | {r['seq_len']} | {r['baseline_cpu_ms']:.2f} | {cpu_cells}"
        print(f"{cpu_row} | {r['steps_each']} |")


if __name__ == "__main__":
    main()
