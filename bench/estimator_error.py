"""The memory estimator's error against GPU measurements other people published (issue #4), and
against our own runner's steps measured on a lent GPU where one was recorded (tests/fixtures/gpu/).

Our own GPU runs can only check the estimator on the machines and library versions we happen to
have; numbers published by litgpt, IBM's fms-acceleration benchmarks and the PEFT docs were taken
on other cards, with other versions, by people with no stake in our formulas. Each point of
`bench/published_measurements.yaml` restates one such run as an oomlens run config (the
assumptions that took are written next to it), so this script only has to build the config,
estimate it and compare the estimate's level that matches what was measured:

    peak_allocated -> MemoryEstimate.peak_allocated_bytes   (torch.cuda.max_memory_allocated)
    peak_active    -> MemoryEstimate.peak_allocated_bytes   (active = allocated without the cache)
    peak_reserved  -> MemoryEstimate.peak_reserved_bytes    (torch.cuda.max_memory_reserved)
    nvidia_smi     -> MemoryEstimate.device_bytes           (reserved + CUDA context)

Targets (issue #4): median |error| <= 5 %, p90 <= 10 % for peak allocated. A point that no
longer builds or estimates is reported as an error row; the run never stops on one point.

    .venv/bin/python -m bench.estimator_error [--traced] [--only ID ...] [--write]

`--traced` adds the traced estimator (a CPU fake-tensor run of the real model: minutes for 70B
models). `--write` replaces the "Estimator error vs published measurements" section of
bench/RESULTS.md with this run's table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diagnosis.libraries import LATEST
from diagnosis.units import GIB
from trainer.config import ConfigError, RunConfig, validate_config

POINTS_PATH = Path(__file__).with_name("published_measurements.yaml")
RESULTS_PATH = Path(__file__).with_name("RESULTS.md")
# The analytic estimator's measured error, for the screens that show an estimate (diagnosis.accuracy).
MEASURED_ERROR_PATH = Path(__file__).resolve().parents[1] / "diagnosis" / "measured_error.json"
SECTION_TITLE = "## Estimator error vs published measurements"

# Which level of a MemoryEstimate a published metric is compared with.
METRIC_LEVEL = {
    "peak_allocated": "peak_allocated_bytes",
    "peak_active": "peak_allocated_bytes",
    "peak_reserved": "peak_reserved_bytes",
    "nvidia_smi": "device_bytes",
}
MODES = ("analytic", "traced")
# Issue #4's targets, in % of the published number.
TARGET_MEDIAN_PCT = 5.0
TARGET_P90_PCT = 10.0
# Rows further off than this are listed under the table with the YAML's expected_gap.
FAR_OFF_PCT = 10.0


@dataclass(frozen=True)
class Point:
    """One published measurement and the run config that reproduces it."""

    id: str
    source: str
    metric: str
    bytes: int
    config: dict[str, Any]
    confidence: str = "high"
    exclude_reason: str | None = None
    gpu: str = ""
    # The training code that produced the number (litgpt, hf-trainer, trl): the estimators model
    # transformers + peft, so a litgpt point also measures how far another implementation is.
    stack: str = ""
    # Why the estimate is expected to miss, where the source's code is known to differ.
    expected_gap: str | None = None
    # Library versions the source states ({"bitsandbytes": "0.42.0", ...}): the estimate follows
    # those that change memory (diagnosis.libraries), never the ones installed on this machine.
    versions: dict[str, str] = field(default_factory=dict)
    # The source's run peaked on its first micro-batch (its loop fed the longest batch first): the
    # analytic estimate of that micro-batch, with nothing an earlier one leaves behind.
    first_micro_batch: bool = False

    @property
    def model(self) -> str:
        return str((self.config.get("model") or {}).get("name", "?"))

    @property
    def estimate_versions(self) -> dict[str, str]:
        """The versions an estimate of this point runs with: the stated ones, else current behaviour."""
        return {name: self.versions.get(name, LATEST) for name in ("bitsandbytes", "transformers", "torch")}


@dataclass
class Row:
    """One point's outcome: an estimate (and its signed error) or why there is none, per mode."""

    point: Point
    setting: str
    estimated: dict[str, int | None] = field(default_factory=dict)
    failure: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def error_pct(self, mode: str) -> float | None:
        """Signed % error: positive means the estimate is above the published number."""
        estimate = self.estimated.get(mode)
        if estimate is None:
            return None
        return (estimate - self.point.bytes) / self.point.bytes * 100


# --- loading -----------------------------------------------------------------------------


def load_points(path: Path = POINTS_PATH) -> tuple[list[Point], dict[str, dict[str, Any]]]:
    """The points and the inline config.json dicts of models that are not presets.

    A malformed point is fatal here (it is a typo in a file we own); a point whose config stops
    validating against trainer/config.py is not (that is what the table should show).
    """
    data = yaml.safe_load(path.read_text())
    model_configs = data.get("model_configs") or {}
    points, seen = [], set()
    for raw in data["points"]:
        metric = raw["metric"]
        if metric not in METRIC_LEVEL:
            raise ValueError(f"{raw['id']}: metric {metric!r} is not one of {', '.join(METRIC_LEVEL)}")
        if raw["id"] in seen:
            raise ValueError(f"duplicate point id {raw['id']!r}")
        seen.add(raw["id"])
        points.append(
            Point(
                id=raw["id"],
                source=" ".join(str(raw["source"]).split()),
                metric=metric,
                bytes=int(raw["bytes"]),
                config=raw.get("config") or {},
                confidence=raw.get("confidence", "high"),
                exclude_reason=raw.get("exclude_from_summary"),
                gpu=raw.get("gpu", ""),
                stack=raw.get("stack", ""),
                expected_gap=raw.get("expected_gap"),
                versions={str(k): str(v) for k, v in (raw.get("versions") or {}).items()},
                first_micro_batch=_first_micro_batch(raw),
            )
        )
    return points, model_configs


def _first_micro_batch(raw: dict[str, Any]) -> bool:
    """`peak_micro_batch: first` must say why in the point's assumptions, as every reading does."""
    where = raw.get("peak_micro_batch", "steady")
    if where not in ("first", "steady"):
        raise ValueError(f"{raw['id']}: peak_micro_batch {where!r} is not 'first' or 'steady'")
    if where == "first" and not any("first micro-batch" in str(line) for line in raw.get("assumptions") or ()):
        raise ValueError(f"{raw['id']}: peak_micro_batch first needs an assumption naming the first micro-batch")
    return where == "first"


GPU_RECORDINGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gpu"
OWN_STACK = "oomlens-runner"
# The reserve (peak reserved − peak allocated) is modelled as a fraction of the tensors, measured on
# GiB-scale peaks; below this the allocator's segment sizes set it instead.
RESERVE_MODEL_FLOOR_BYTES = 1024**3
SMALL_RESERVE_GAP = (
    "the reserve is modelled as a fraction of the tensors measured on GiB-scale peaks; at tens of MiB the caching "
    "allocator's segment sizes (2 MiB for requests up to 1 MiB, 20 MiB for requests up to 10 MiB) set it instead, "
    "which is not modelled (a likely cause, not measured)"
)


def recorded_points(folder: Path = GPU_RECORDINGS) -> list[Point]:
    """Steady-state steps our own runner measured on a lent GPU (bench/gpu_record.py's peaks.json,
    kept unchanged under tests/fixtures/gpu/): peak allocated and peak reserved, per config."""
    points = []
    for manifest_path in sorted(folder.glob("*/manifest.json")):
        peaks_path = manifest_path.with_name("peaks.json")
        if not peaks_path.is_file():
            continue
        manifest = json.loads(manifest_path.read_text())
        source = f"oomlens bench/gpu_record.py, torch {manifest['torch']} ({manifest_path.parent.name})"
        for row in json.loads(peaks_path.read_text()):
            measured = row.get("measured") or {}
            if "peak_allocated_bytes" not in measured:
                continue
            for metric in ("peak_allocated", "peak_reserved"):
                small_reserve = metric == "peak_reserved" and measured[f"{metric}_bytes"] < RESERVE_MODEL_FLOOR_BYTES
                points.append(
                    Point(
                        id=f"gpu-{row['name']}-{metric.split('_')[1]}",
                        source=source,
                        metric=metric,
                        bytes=int(measured[f"{metric}_bytes"]),
                        config=row["config"],
                        gpu=manifest["gpu"],
                        stack=OWN_STACK,
                        versions={"torch": manifest["torch"]},
                        expected_gap=SMALL_RESERVE_GAP if small_reserve else None,
                    )
                )
    return points


def build_config(point: Point, model_configs: dict[str, dict[str, Any]], workdir: Path) -> RunConfig:
    """Validate the point's config; a model given inline is written out as a config.json first.

    `model.name` accepts a config.json path, so a model that is not a preset (Llama-2-70B,
    phi-1.5) needs no preset of its own; the file lives only as long as the run.
    """
    raw = copy.deepcopy(point.config)
    name = point.model
    if name in model_configs:
        target = workdir / name / "config.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(model_configs[name], indent=2))
        raw.setdefault("model", {})["name"] = str(target)
    return validate_config(raw)


def describe(config: dict[str, Any]) -> str:
    """A short label of what was trained: method, batch x length, precision, memory features."""
    model = config.get("model") or {}
    train = config.get("train") or {}
    lora = config.get("lora")
    deepspeed = config.get("deepspeed") or {}
    if lora is None:
        method = "full"
    else:
        method = f"{'QLoRA' if model.get('quantization', 'none') != 'none' else 'LoRA'} r{lora.get('r', 8)}"
        method += f" x{len(lora.get('target_modules', ['q_proj', 'v_proj']))}"
    parts = [method, f"{train.get('micro_batch_size', 2)}x{(config.get('data') or {}).get('seq_len', 256)}"]
    parts.append(model.get("dtype", "fp32") + ("+amp" if train.get("mixed_precision", "no") != "no" else ""))
    if model.get("gradient_checkpointing"):
        parts.append("GC")
    attention = model.get("attn_implementation", "sdpa")
    parts.append({"flash_attention_2": "FA2"}.get(attention, attention))
    if deepspeed.get("zero_stage"):
        offload = [kind for kind in ("offload_params", "offload_optimizer") if deepspeed.get(kind, "none") != "none"]
        parts.append(f"Z{deepspeed['zero_stage']}x{train.get('num_gpus', 1)}" + ("+offload" if offload else ""))
    fsdp = config.get("fsdp")
    if fsdp is not None:
        strategy = {"shard_grad_op": "FSDP-grad-op", "no_shard": "DDP"}.get(fsdp.get("sharding_strategy", ""), "FSDP")
        parts.append(f"{strategy}x{train.get('num_gpus', 1)}" + ("+offload" if fsdp.get("offload_params") else ""))
    return " ".join(parts)


# --- estimating ----------------------------------------------------------------------------


def _estimator(mode: str) -> Callable[..., Any]:
    """Imported on first use: the traced estimator pulls in torch and transformers (seconds)."""
    if mode == "analytic":
        from diagnosis.analytic import estimate_analytic

        return estimate_analytic
    from diagnosis.traced import estimate_traced

    return estimate_traced


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def evaluate(points: Sequence[Point], model_configs: dict[str, dict[str, Any]], modes: Sequence[str]) -> list[Row]:
    """Estimate every point with every mode; each failure becomes a message on its row."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="oomlens-published-") as tmp:
        for point in points:
            row = Row(point, describe(point.config) + (" first" if point.first_micro_batch else ""))
            rows.append(row)
            try:
                cfg = build_config(point, model_configs, Path(tmp))
            except ConfigError as error:
                message = "config: " + "; ".join(str(issue) for issue in error.issues)[:160]
                row.failure = {mode: message for mode in modes}
                continue
            for mode in modes:
                started = time.perf_counter()
                try:
                    first = {"first_micro_batch": True} if point.first_micro_batch and mode == "analytic" else {}
                    estimate = _estimator(mode)(
                        cfg, device="cuda", gpu=point.gpu or None, **point.estimate_versions, **first
                    )
                    if point.first_micro_batch and not first:  # after the estimator's own refusal, if any
                        raise NotImplementedError("the traced estimate steps a steady-state micro-batch only")
                    row.estimated[mode] = int(getattr(estimate, METRIC_LEVEL[point.metric]))
                except Exception as error:  # noqa: BLE001 - one broken point must not hide the rest
                    row.failure[mode] = _one_line(error)
                row.seconds[mode] = time.perf_counter() - started
            status = ", ".join(
                f"{mode} {_pct(row.error_pct(mode))}" if mode in row.estimated else f"{mode} failed" for mode in modes
            )
            print(f"  {point.id}: {status}", file=sys.stderr, flush=True)
    return rows


# --- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so p90 of 10 values is not
    simply the largest one."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    label: str
    count: int
    median_abs_pct: float | None
    p90_abs_pct: float | None
    median_signed_pct: float | None

    def meets_target(self) -> bool | None:
        if self.median_abs_pct is None or self.p90_abs_pct is None:
            return None
        return self.median_abs_pct <= TARGET_MEDIAN_PCT and self.p90_abs_pct <= TARGET_P90_PCT


def summarize(label: str, errors: Iterable[float]) -> Summary:
    errors = list(errors)
    if not errors:
        return Summary(label, 0, None, None, None)
    absolute = [abs(error) for error in errors]
    return Summary(
        label, len(errors), statistics.median(absolute), percentile(absolute, 0.9), statistics.median(errors)
    )


def summaries(rows: Sequence[Row], mode: str) -> list[Summary]:
    """Per metric, overall, high-confidence peak allocated (the issue's headline number), and
    peak allocated per training stack.

    Points marked exclude_from_summary (architectures the estimator does not model) and rows
    without an estimate are left out; the table still shows them.
    """
    counted = [row for row in rows if row.point.exclude_reason is None and row.error_pct(mode) is not None]
    # Our own recordings taught the estimators some rules (the cuBLAS workspaces, CUDA's math kernel
    # for fp32 GQA, its softmax backward): in-sample, so they are summarised apart, by stack only.
    published = [row for row in counted if row.point.stack != OWN_STACK]
    result = []
    for metric in METRIC_LEVEL:
        errors = [row.error_pct(mode) for row in published if row.point.metric == metric]
        if errors:
            result.append(summarize(metric, errors))
    result.append(summarize("all metrics", (row.error_pct(mode) for row in published)))
    result.append(
        summarize(
            "peak_allocated, high confidence",
            (
                row.error_pct(mode)
                for row in published
                if row.point.metric == "peak_allocated" and row.point.confidence == "high"
            ),
        )
    )
    for stack in sorted({row.point.stack for row in counted if row.point.stack}):
        errors = [
            row.error_pct(mode) for row in counted if row.point.metric == "peak_allocated" and row.point.stack == stack
        ]
        if errors:
            result.append(summarize(f"peak_allocated, stack {stack}", errors))
    return result


# --- reporting -----------------------------------------------------------------------------


def _gib(value: int | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f}%"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table_lines(rows: Sequence[Row], modes: Sequence[str]) -> list[str]:
    """Markdown: one row per point; an estimator that failed shows its reason instead of a number."""
    header = ["id", "stack", "model", "setting", "metric", "conf.", "published GiB"]
    for mode in modes:
        header += [f"{mode} GiB", f"{mode} error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        point = row.point
        conf = point.confidence + (" (excl.)" if point.exclude_reason else "")
        cells = [point.id, point.stack, point.model, row.setting, point.metric, conf, _gib(point.bytes)]
        for mode in modes:
            if mode in row.estimated:
                cells += [_gib(row.estimated[mode]), _pct(row.error_pct(mode))]
            else:
                cells += ["—", "failed: " + row.failure.get(mode, "?")]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return lines


def far_off_lines(rows: Sequence[Row], modes: Sequence[str]) -> list[str]:
    """The rows beyond FAR_OFF_PCT in any mode, grouped by the reason the YAML gives (or none),
    so one cause shared by five points reads once."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        off = [(mode, row.error_pct(mode)) for mode in modes]
        off = [(mode, error) for mode, error in off if error is not None and abs(error) > FAR_OFF_PCT]
        if not off:
            continue
        point = row.point
        reason = point.expected_gap or (f"excluded: {point.exclude_reason}" if point.exclude_reason else "")
        by_mode = ", ".join(f"{mode} {_pct(error)}" for mode, error in off)
        groups.setdefault(reason or "no known reason yet", []).append(f"`{point.id}` ({by_mode})")
    return [f"- {'; '.join(ids)}: {reason}" for reason, ids in groups.items()]


def summary_lines(rows: Sequence[Row], modes: Sequence[str]) -> list[str]:
    lines = [
        "| estimator | points | n | median \\|error\\| | p90 \\|error\\| | median signed | target met |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        for summary in summaries(rows, mode):
            met = summary.meets_target()
            verdict = "—" if met is None or not summary.label.startswith("peak_allocated") else ("yes" if met else "no")
            lines.append(
                f"| {mode} | {summary.label} | {summary.count} | {_abs(summary.median_abs_pct)} | "
                f"{_abs(summary.p90_abs_pct)} | {_pct(summary.median_signed_pct)} | {verdict} |"
            )
    return lines


def _abs(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}%"


def machine() -> str:
    """Where the estimate ran (the estimators are CPU-side: the GPU of each point is in the YAML)."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # the analytic mode needs no torch
        torch_version = "not installed"
    system = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    return f"{system}, Python {platform.python_version()}, torch {torch_version}"


def _left_out(excluded: Sequence[str], failed: int) -> str:
    """What the statistics leave out; the table shows every row either way."""
    parts = []
    if excluded:
        parts.append(
            f"{len(excluded)} point(s) marked `exclude_from_summary` (a setting the schema cannot express, or an "
            f"architecture no estimator models; the reason is in the YAML: {', '.join(excluded)})"
        )
    if failed:
        parts.append(
            f"from each estimator's figures the rows it refused ({failed} row(s) refused by one estimator or both; "
            "the reason is in the table)"
        )
    return f"Statistics leave out {' and '.join(parts)}; the table still shows them." if parts else ""


def section(rows: Sequence[Row], modes: Sequence[str], command: str) -> str:
    """The RESULTS.md section: what ran, the table, the statistics, what to read into them."""
    failed = sum(1 for row in rows if any(mode not in row.estimated for mode in modes))
    excluded = [row.point.id for row in rows if row.point.exclude_reason]
    published = [row for row in rows if row.point.stack != OWN_STACK]
    own = len(rows) - len(published)
    sources = sorted({row.point.source.split()[0] for row in published})
    recorded = (
        f" Beside them, {own} points our runner measured on a lent GPU (tests/fixtures/gpu/, stack {OWN_STACK}): "
        "they taught the estimators some CUDA rules, so they are in-sample and summarised only in their own row."
        if own
        else ""
    )
    lines = [
        SECTION_TITLE,
        "",
        f"`{command}` — {datetime.date.today().isoformat()}, {machine()}. {len(published)} published points from "
        f"{len(sources)} sources, each with its quote, unit and the assumptions that restate it as a run config in "
        "`bench/published_measurements.yaml`. Error = (estimate − published) / published; positive means the "
        "estimate is high. The GPU each number was measured on is in the YAML; the estimate itself runs here."
        + recorded,
        "",
        *summary_lines(rows, modes),
        "",
        f"Targets (issue #4): median \\|error\\| ≤ {TARGET_MEDIAN_PCT:g}%, p90 ≤ {TARGET_P90_PCT:g}% for peak "
        f"allocated. {_left_out(excluded, failed)}",
        "",
        *table_lines(rows, modes),
        "",
    ]
    far_off = far_off_lines(rows, modes)
    if far_off:
        lines += [f"Points off by more than {FAR_OFF_PCT:g}%, and what is known about why:", "", *far_off, ""]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS_PATH) -> None:
    """Replace our section in place (from its title to the next `## `), or append it; the other
    sections of RESULTS.md are other benches' and stay byte for byte."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    start = current.find(SECTION_TITLE + "\n")
    if start == -1:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        end = current.find("\n## ", start + len(SECTION_TITLE))
        tail = "" if end == -1 else current[end + 1 :]
        updated = current[:start] + text + ("\n" + tail if tail else "")
    path.write_text(updated.rstrip("\n") + "\n")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def measured_error_document(rows: Sequence[Row], command: str) -> dict[str, Any]:
    """The analytic mode's summaries, as diagnosis.accuracy reads them."""
    return {
        "measured": datetime.date.today().isoformat(),
        "command": command,
        "details": "bench/RESULTS.md, section: " + SECTION_TITLE.removeprefix("## "),
        "analytic": [
            {
                "label": summary.label,
                "count": summary.count,
                "median_abs_pct": _rounded(summary.median_abs_pct),
                "p90_abs_pct": _rounded(summary.p90_abs_pct),
                "median_signed_pct": _rounded(summary.median_signed_pct),
            }
            for summary in summaries(rows, "analytic")
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=Path, default=POINTS_PATH, help="YAML of published measurements")
    parser.add_argument("--traced", action="store_true", help="also run the traced estimator (slow)")
    parser.add_argument("--only", nargs="+", metavar="ID", help="estimate these point ids only")
    parser.add_argument(
        "--write",
        action="store_true",
        help=f"replace the section in {RESULTS_PATH.name} and the summary in diagnosis/{MEASURED_ERROR_PATH.name}",
    )
    parser.add_argument(
        "--write-summary", action="store_true", help=f"only rewrite diagnosis/{MEASURED_ERROR_PATH.name} (analytic)"
    )
    parser.add_argument(
        "--no-recorded", action="store_true", help="leave out our own GPU recordings (tests/fixtures/gpu/*/peaks.json)"
    )
    args = parser.parse_args(argv)

    points, model_configs = load_points(args.points)
    if not args.no_recorded:
        points += recorded_points()
    if args.only and (args.write or args.write_summary):
        parser.error("--write and --write-summary need every point: drop --only")
    if args.only:
        unknown = sorted(set(args.only) - {point.id for point in points})
        if unknown:
            parser.error(f"unknown point id(s): {', '.join(unknown)}")
        points = [point for point in points if point.id in args.only]
    modes = MODES if args.traced else MODES[:1]
    print(f"estimating {len(points)} point(s) with {', '.join(modes)}", file=sys.stderr)
    rows = evaluate(points, model_configs, modes)

    command = ".venv/bin/python -m bench.estimator_error" + (" --traced" if args.traced else "")
    if args.only:
        command += " --only " + " ".join(args.only)
    text = section(rows, modes, command)
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote the section to {RESULTS_PATH}", file=sys.stderr)
    if args.write or args.write_summary:
        document = measured_error_document(rows, command)
        MEASURED_ERROR_PATH.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote the analytic summary to {MEASURED_ERROR_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
