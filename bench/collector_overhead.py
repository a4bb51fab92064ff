"""Per-step cost of the collector: step time with it vs without, side by side in one process.

Blocks of steps rotate between a monitor that does nothing and collector variants, on the same
model, optimizer and data stream, so drift in the machine's speed hits all alike:
  default       what a run gets by default: activation hooks, tensor breakdown, host probe,
                allocator probe on CUDA, module tracking, layer profile on steps 1-2 and every
                50th, samples through the sink into a real SQLite file;
  no_modules    the same without module tracking (and so without layer profiles);
  profile_all   a layer profile on every step: the cost of one profiled step.
Reports each variant's median block time against the baseline's, and the median of the paired
differences (each block's variant time minus the same round's baseline), which cancels the drift
between rounds. On a 2-core machine the same code costs a different share from one process to the
next, so `--processes N` repeats the whole measurement in N fresh processes and reports each.

    .venv/bin/python -m bench.collector_overhead [--seq-len 256] [--blocks 300] [--block-steps 1]
        [--processes 3] [--model tiny-llama] [--dtype fp32] [--micro-batch 2]

`--model` takes any runner model name (a preset such as llama-3.2-1b is built from its config with
random weights): the fixed per-step cost of the hooks weighs differently on a real fine-tuning step
than on the tiny Llama's 25 ms one, which is why the GPU check runs both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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


def measure(
    seq_len: int, blocks: int, block_steps: int, device: str, model: str = "tiny-llama", dtype: str = "fp32",
    micro_batch: int = 2,
) -> dict:  # fmt: skip
    cfg = validate_config(
        {
            "model": {"name": model, "dtype": dtype},
            "data": {"seq_len": seq_len},
            "train": {"max_steps": block_steps, "device": device, "micro_batch_size": micro_batch},
        }
    )
    training = setup(cfg, resolve_device(cfg.train.device))
    times: dict[str, list[float]] = {"baseline": [], **{name: [] for name in VARIANTS}}
    # The training thread's CPU time too: steadier than wall time when other work shares the two
    # cores (time spent preempted is not counted), though it leaves out the sink's writer thread.
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
                started, cpu_started = time.perf_counter(), time.thread_time()
                train(training, monitor, next(steps))
                if training.device.type == "cuda":
                    torch.cuda.synchronize()
                if block:
                    times[name].append((time.perf_counter() - started) / block_steps)
                    cpu_times[name].append((time.thread_time() - cpu_started) / block_steps)
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
        "model": f"{model} {dtype} x{micro_batch}",
        "seq_len": seq_len,
        "baseline_ms": baseline_ms,
        "baseline_cpu_ms": baseline_cpu_ms,
        "steps_each": blocks * block_steps,
    }
    for name in VARIANTS:
        ms = statistics.median(times[name]) * 1e3
        result[name] = (ms, (ms / baseline_ms - 1) * 100)
        paired = statistics.median(v - b for v, b in zip(times[name], times["baseline"], strict=True)) * 1e3
        result[f"{name}_paired"] = (paired, paired / baseline_ms * 100)
        cpu_ms = statistics.median(cpu_times[name]) * 1e3
        cpu_paired = statistics.median(v - b for v, b in zip(cpu_times[name], cpu_times["baseline"], strict=True))
        result[f"{name}_cpu"] = (cpu_ms, cpu_paired * 1e3 / baseline_cpu_ms * 100)
    return result


def _in_fresh_process(seq_len: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "bench.collector_overhead", "--one", "--seq-len", str(seq_len),
        "--blocks", str(args.blocks), "--block-steps", str(args.block_steps), "--device", args.device,
        "--model", args.model, "--dtype", args.dtype, "--micro-batch", str(args.micro_batch),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_table(results: list[dict]) -> None:
    columns = " | ".join(f"{name} ms (ratio; paired)" for name in VARIANTS)
    print(f"model {results[0].get('model', 'tiny-llama fp32 x2')}")
    print(f"| process | device | seq_len | no collector ms | {columns} | steps each |")
    print("|---" * (5 + len(VARIANTS)) + "|")
    for index, r in enumerate(results, 1):
        cells = " | ".join(
            f"{r[name][0]:.2f} ({r[name][1]:+.1f}%; {r[name + '_paired'][1]:+.1f}%)" for name in VARIANTS
        )
        print(f"| {index} | {r['device']} | {r['seq_len']} | {r['baseline_ms']:.2f} | {cells} | {r['steps_each']} |")
        cpu_cells = " | ".join(f"{r[name + '_cpu'][0]:.2f} (paired {r[name + '_cpu'][1]:+.1f}%)" for name in VARIANTS)
        print(f"| {index} | training thread CPU | {r['seq_len']} | {r['baseline_cpu_ms']:.2f} | {cpu_cells} | |")
    if len(results) > 1:
        summary = " | ".join(
            f"{statistics.median(r[name][1] for r in results):+.1f}% "
            f"(paired {statistics.median(r[name + '_paired'][1] for r in results):+.1f}%; "
            f"range {min(r[name][1] for r in results):+.1f}% … {max(r[name][1] for r in results):+.1f}%; "
            f"training thread CPU paired {statistics.median(r[name + '_cpu'][1] for r in results):+.1f}%)"
            for name in VARIANTS
        )
        print(f"| median of {len(results)} | | {results[0]['seq_len']} | | {summary} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--blocks", type=int, default=300)
    parser.add_argument("--block-steps", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per sequence length")
    parser.add_argument("--model", default="tiny-llama", help="a runner model name (preset, directory)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one JSON line
    args = parser.parse_args()
    if args.one:
        result = measure(
            args.seq_len[0], args.blocks, args.block_steps, args.device, args.model, args.dtype, args.micro_batch
        )
        print(json.dumps(result))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for seq_len in args.seq_len:
        _print_table([_in_fresh_process(seq_len, args) for _ in range(args.processes)])


if __name__ == "__main__":
    main()
