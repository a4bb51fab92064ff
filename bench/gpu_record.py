"""Record what a real CUDA run produces, for the CPU-only suite to test against (tests/fixtures/gpu/).

Runs on a lent GPU only (`scripts/gpu_check.sh` calls it). Nothing here is a model of a GPU: every
number is read from torch, the allocator or NVML while real kernels run. Writes into --out:

  manifest.json           torch, CUDA, GPU, driver, nvidia-smi's text, one NVML reading (collector.nvml)
  memory_stats.json       torch.cuda.memory_stats() after each of 3 training steps of tiny-llama
  oom.json                a real fraction-capped CUDA OOM: the exception's text, and what the OOM
                          observer (collector.cuda_oom) read at the failing allocation
  oom_snapshot.pickle.gz  the allocator snapshot the observer took there (history of 20,000 entries)
  peaks.json              per config: peak allocated / reserved of a steady-state training step,
                          measured, beside the analytic and traced estimates for device=cuda

Copy the folder to tests/fixtures/gpu/<torch>-<gpu>/ (the name the manifest suggests) and commit it;
tests/diagnosis/test_gpu_fixtures.py reads every such folder.

    python3 -m bench.gpu_record --out DIR [--skip-traced]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.collector_overhead import NullMonitor
from collector.cuda_oom import CudaOomObserver, save_snapshot
from collector.nvml import NvmlUnavailable, open_nvml
from trainer.config import RunConfig, validate_config
from trainer.environment import package_versions
from trainer.loop import setup, train
from trainer.memory_limit import apply_memory_limit

SNAPSHOT_ENTRIES = 20_000
SNAPSHOT_CAP_BYTES = 15 * 1024**2  # what the device tool brings back per file is 16 MiB

# Configs whose steady-state step is measured: the runner's tiny models (their peaks are MiBs, so the
# CUDA context's own allocations weigh) and three real architectures at sizes one GPU trains.
PEAK_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama-lora-sdpa": {"data": {"seq_len": 512}},
    "tiny-llama-lora-eager": {"data": {"seq_len": 512}, "model": {"attn_implementation": "eager"}},
    "tiny-llama-lora-checkpointing": {"data": {"seq_len": 512}, "model": {"gradient_checkpointing": True}},
    "tiny-llama-full": {"data": {"seq_len": 512}, "lora": None},
    "tiny-qwen2-lora-bf16": {"model": {"name": "tiny-qwen2", "dtype": "bf16"}, "data": {"seq_len": 512}},
    "tiny-gpt2-lora": {
        "model": {"name": "tiny-gpt2"},
        "lora": {"target_modules": ["c_attn"]},
        "data": {"seq_len": 512},
    },
    "llama-3.2-1b-lora-bf16-2k": {
        "model": {"name": "llama-3.2-1b", "dtype": "bf16"},
        "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"seq_len": 2048},
        "train": {"micro_batch_size": 2},
    },
    "llama-3.2-1b-lora-bf16-4k-checkpointing": {
        "model": {"name": "llama-3.2-1b", "dtype": "bf16", "gradient_checkpointing": True},
        "lora": {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"seq_len": 4096},
        "train": {"micro_batch_size": 2},
    },
    "qwen2.5-0.5b-full-bf16-1k": {
        "model": {"name": "qwen2.5-0.5b", "dtype": "bf16"},
        "lora": None,
        "data": {"seq_len": 1024},
        "train": {"micro_batch_size": 4},
    },
    "llama-3.2-1b-full-amp-1k": {
        "model": {"name": "llama-3.2-1b", "dtype": "fp32"},
        "lora": None,
        "data": {"seq_len": 1024},
        "train": {"micro_batch_size": 2, "mixed_precision": "bf16"},
    },
    # train.loss_chunk_tokens beside the same configs without it: the saving on a real GPU.
    "qwen2.5-0.5b-full-bf16-1k-chunked-loss": {
        "model": {"name": "qwen2.5-0.5b", "dtype": "bf16"},
        "lora": None,
        "data": {"seq_len": 1024},
        "train": {"micro_batch_size": 4, "loss_chunk_tokens": 1024},
    },
    "llama-3.2-1b-lora-bf16-4k-checkpointing-chunked-loss": {
        "model": {"name": "llama-3.2-1b", "dtype": "bf16", "gradient_checkpointing": True},
        "lora": {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"seq_len": 4096},
        "train": {"micro_batch_size": 2, "loss_chunk_tokens": 1024},
    },
}


def _config(sections: dict[str, Any]) -> RunConfig:
    return validate_config({**sections, "train": {"max_steps": 1, "device": "cuda", **sections.get("train", {})}})


def _release() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def manifest() -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    properties = torch.cuda.get_device_properties(device)
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60, check=False)
    nvml = open_nvml(torch.cuda._get_nvml_device_index(device))
    if isinstance(nvml, NvmlUnavailable):
        nvml_reading: dict[str, Any] = {"available": False, "reason": nvml.reason}
        driver = None
    else:
        nvml_reading = {"available": True, **dataclasses.asdict(nvml.sample())}
        try:
            import pynvml

            driver = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001 - the driver's version is a label, not a reading
            driver = None
        nvml.close()
    gpu = torch.cuda.get_device_name(device)
    folder = re.sub(r"[^A-Za-z0-9.]+", "-", f"torch-{torch.__version__}-{gpu}").strip("-")
    return {
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        # The estimates follow these (diagnosis.libraries): a later reader must not guess them.
        "versions": package_versions(),
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "gpu_total_bytes": properties.total_memory,
        "driver": driver,
        "suggested_folder": f"tests/fixtures/gpu/{folder}",
        "nvml": nvml_reading,
        "nvidia_smi": smi.stdout if smi.returncode == 0 else f"nvidia-smi failed: {smi.stderr.strip()}",
    }


def memory_stats_steps() -> dict[str, Any]:
    """memory_stats() after each of three steps, the peaks reset before each (as the collector does)."""
    cfg = _config({"data": {"seq_len": 256}})
    training = setup(cfg, torch.device("cuda"))
    steps = []
    for step in range(1, 4):
        torch.cuda.reset_peak_memory_stats()
        train(training, NullMonitor(), step)
        torch.cuda.synchronize()
        steps.append({"step": step, "memory_stats": torch.cuda.memory_stats()})
    del training
    _release()
    return {"config": cfg.to_dict(), "steps": steps}


def cuda_oom(out: Path) -> dict[str, Any]:
    """Eager attention at 4,096 tokens under a 0.25 GiB memory fraction: the runner's own CPU OOM
    scenario, on the CUDA allocator, with the observer attached as the worker attaches it."""
    cfg = _config({"data": {"seq_len": 4096}, "model": {"attn_implementation": "eager"}})
    device = torch.device("cuda", torch.cuda.current_device())
    training = setup(cfg, device)
    limit = apply_memory_limit(0.25, device)
    observer = CudaOomObserver(device, SNAPSHOT_ENTRIES)
    error_text = None
    error_type = None
    try:
        train(training, NullMonitor(), 1)
    except torch.OutOfMemoryError as error:
        error_text, error_type = str(error), type(error).__name__
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.memory._record_memory_history(enabled=None)
    capture = observer.capture
    record: dict[str, Any] = {"config": cfg.to_dict(), "limit": limit}
    record |= {"error_type": error_type, "error_text": error_text}
    if capture is None:
        record["capture"] = None
    else:
        record["capture"] = {
            "requested_bytes": capture.requested_bytes,
            "device_free_bytes": capture.device_free_bytes,
            "device_total_bytes": capture.device_total_bytes,
            "allocator_stats": capture.allocator_stats,
        }
        if capture.snapshot is not None:
            written, note = save_snapshot(capture.snapshot, out / "oom_snapshot.pickle.gz", SNAPSHOT_CAP_BYTES)
            record["snapshot_bytes"], record["snapshot_note"] = written, note
    del training
    _release()
    return record


def measured_peak(cfg: RunConfig) -> dict[str, int]:
    """Peak allocated and reserved over the second step (the first creates the optimizer states)."""
    _release()
    before = torch.cuda.memory_allocated()
    training = setup(cfg, torch.device("cuda"))
    train(training, NullMonitor(), 1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train(training, NullMonitor(), 2)
    torch.cuda.synchronize()
    result = {
        "allocated_before_setup_bytes": before,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "num_alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
    }
    del training
    _release()
    return result


def peaks(skip_traced: bool, progress: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Each row handed to `progress` as it is measured: a run cut off by the device's time limit
    still brings back the rows it finished."""
    from diagnosis.analytic import estimate_analytic

    rows = []
    gpu = torch.cuda.get_device_name()
    for name, sections in PEAK_CONFIGS.items():
        cfg = _config(sections)
        row: dict[str, Any] = {"name": name, "config": cfg.to_dict()}
        try:
            row["measured"] = measured_peak(cfg)
        except torch.OutOfMemoryError as error:
            row["measured"] = {"error": str(error)}
            _release()
        analytic = estimate_analytic(cfg, device="cuda", gpu=gpu)
        row["analytic"] = {
            "peak_allocated_bytes": analytic.peak_allocated_bytes,
            "peak_reserved_bytes": analytic.peak_reserved_bytes,
            "breakdown": analytic.breakdown,
        }
        if not skip_traced:
            from diagnosis.traced import estimate_traced

            try:
                traced = estimate_traced(cfg, device="cuda", gpu=gpu)
                row["traced"] = {"peak_allocated_bytes": traced.peak_allocated_bytes, "breakdown": traced.breakdown}
            except Exception as error:  # noqa: BLE001 - recorded, not hidden
                row["traced"] = {"error": f"{type(error).__name__}: {error}"}
        measured = row["measured"].get("peak_allocated_bytes")
        if measured:
            row["analytic_error"] = analytic.peak_allocated_bytes / measured - 1
            if "peak_allocated_bytes" in row.get("traced", {}):
                row["traced_error"] = row["traced"]["peak_allocated_bytes"] / measured - 1
        print(f"{name}: measured {measured}, analytic error {row.get('analytic_error')}", flush=True)
        rows.append(row)
        progress(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-traced", action="store_true", help="leave out the traced estimates (faster)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_record needs a CUDA GPU; nothing was recorded")
    args.out.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: Any) -> None:
        (args.out / name).write_text(json.dumps(data, indent=1, default=str))
        print(f"wrote {args.out / name}", flush=True)

    write("manifest.json", manifest())
    write("memory_stats.json", memory_stats_steps())
    peaks(args.skip_traced, lambda rows: write("peaks.json", rows))
    write("oom.json", cuda_oom(args.out))  # last: the observer stays attached to this process


if __name__ == "__main__":
    main()
