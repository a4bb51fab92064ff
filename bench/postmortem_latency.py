"""Time from an out-of-memory failure reaching the trainer to its post-mortem committed.

Runs the real worker in this process on a config that fails in the CPU allocator under
`memory.limit_gb` (eager attention at 4,096 tokens), and measures from the moment the exception
reaches the worker's handler to `Worker.run()` returning: building the post-mortem, flushing the
sink, and the one transaction that stores it with the run's oom status. A CUDA run adds the
allocator snapshot taken by the OOM observer (with `monitor.snapshot_max_entries` history); that
part needs a GPU and is measured with `--device cuda` there. On CUDA the failing step would leave
the history nearly empty (the OOM comes in the first layer of the first forward), so real training
steps at 512 tokens fill it first, until it holds `--history-entries`; the time is given both from
the failing allocation (the observer copying the history out) and from the exception.

    .venv/bin/python -m bench.postmortem_latency [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from db import open_engine
from db.queries import get_postmortem
from db.writes import create_run
from trainer import worker as worker_module
from trainer.config import validate_config
from trainer.worker import Worker


class TimedWorker(Worker):
    """Stamps the moment the failure reaches the handler (its first call there)."""

    failed_at: float | None = None

    @staticmethod
    def _classify(error, text):
        TimedWorker.failed_at = time.perf_counter()
        return Worker._classify(error, text)


class TimedObserver(worker_module.CudaOomObserver):
    """Stamps the failing allocation: the observer runs before the exception is raised."""

    observed_at: float | None = None

    def _observe(self, device, alloc, device_allocated, device_free):
        if self.capture is None:
            TimedObserver.observed_at = time.perf_counter()
        super()._observe(device, alloc, device_allocated, device_free)


def _train_after_filling_history(entries: int):
    """The worker's `train`, preceded by real forward/backward steps at 512 tokens until the
    allocator history (recording since the observer was attached) holds `entries`."""

    def train(training, monitor, first_step=1):
        model = training.built.model
        short = torch.randint(0, model.config.vocab_size, (2, 512), device=training.device)

        def one_step():
            model(input_ids=short, labels=short).loss.backward()
            model.zero_grad(set_to_none=True)

        one_step()
        per_step = len(torch.cuda.memory._snapshot()["device_traces"][training.device.index or 0])
        for _ in range(entries // max(per_step, 1) + 2):
            one_step()
        return worker_module.train.__wrapped__(training, monitor, first_step)

    return train


def history_entries_kept(run_id: int, url: str) -> int | None:
    from diagnosis.safe_pickle import load_path

    path = get_postmortem(open_engine(url), run_id).snapshot_path
    if not path:
        return None
    return sum(len(trace) for trace in load_path(path).get("device_traces", []))


def once(device: str, history_entries: int) -> tuple[float, float | None, int | None]:
    cfg = validate_config(
        {
            "model": {"attn_implementation": "eager"},
            "data": {"seq_len": 4096},
            "train": {"max_steps": 2, "device": device},
            "memory": {"limit_gb": 0.25 if device == "cpu" else 2.0},
            "monitor": {"snapshot_max_entries": history_entries},
        }
    )
    with tempfile.TemporaryDirectory() as workspace:
        url = f"sqlite:///{Path(workspace) / 'bench.db'}"
        run_id = create_run(open_engine(url), cfg.to_dict())
        worker = TimedWorker(run_id, url)
        TimedObserver.observed_at = None
        code = worker.run()
        done = time.perf_counter()
        assert code == 3, f"expected an OOM (exit 3), got {code}"
        assert get_postmortem(open_engine(url), run_id) is not None
        from_allocation = done - TimedObserver.observed_at if TimedObserver.observed_at else None
        kept = history_entries_kept(run_id, url) if device != "cpu" else None
        return done - TimedWorker.failed_at, from_allocation, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--history-entries", type=int, default=100_000)
    args = parser.parse_args()
    if args.device != "cpu":
        real_train = worker_module.train
        worker_module.train = _train_after_filling_history(args.history_entries)
        worker_module.train.__wrapped__ = real_train
        worker_module.CudaOomObserver = TimedObserver
    runs = [once(args.device, args.history_entries) for _ in range(args.repeats)]
    from_exception = [r[0] for r in runs]
    print(
        "| device | history entries (asked; in the snapshot) | from the exception: median, max | "
        "from the failing allocation: median, max |"
    )
    print("|---|---|---|---|")
    kept = ", ".join(f"{r[2]:,}" for r in runs if r[2] is not None) or "none"
    allocation = [r[1] for r in runs if r[1] is not None]
    since_allocation = (
        f"{statistics.median(allocation):.3f} s, {max(allocation):.3f} s" if allocation else "(no observer)"
    )
    print(
        f"| {args.device} | {args.history_entries:,}; {kept} | {statistics.median(from_exception):.3f} s, "
        f"{max(from_exception):.3f} s | {since_allocation} |"
    )


if __name__ == "__main__":
    main()
