"""Time from an out-of-memory failure reaching the trainer to its post-mortem committed.

Runs the real worker in this process on a config that fails in the CPU allocator under
`memory.limit_gb` (eager attention at 4,096 tokens), and measures from the moment the exception
reaches the worker's handler to `Worker.run()` returning: building the post-mortem, flushing the
sink, and the one transaction that stores it with the run's oom status. A CUDA run adds the
allocator snapshot taken by the OOM observer (with `monitor.snapshot_max_entries` history); that
part needs a GPU and is measured with `--device cuda` there.

    .venv/bin/python -m bench.postmortem_latency [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from db import open_engine
from db.queries import get_postmortem
from db.writes import create_run
from trainer.config import validate_config
from trainer.worker import Worker


class TimedWorker(Worker):
    """Stamps the moment the failure reaches the handler (its first call there)."""

    failed_at: float | None = None

    @staticmethod
    def _classify(error, text):
        TimedWorker.failed_at = time.perf_counter()
        return Worker._classify(error, text)


def once(device: str, history_entries: int) -> float:
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
        code = worker.run()
        done = time.perf_counter()
        assert code == 3, f"expected an OOM (exit 3), got {code}"
        assert get_postmortem(open_engine(url), run_id) is not None
        return done - TimedWorker.failed_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--history-entries", type=int, default=100_000)
    args = parser.parse_args()
    seconds = [once(args.device, args.history_entries) for _ in range(args.repeats)]
    print(f"| {args.device} | {args.history_entries:,} | {statistics.median(seconds):.3f} s | {max(seconds):.3f} s |")


if __name__ == "__main__":
    main()
