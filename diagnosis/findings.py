"""Which step caused it: compare the failing batch and the memory trend with the run so far.

Pure functions over plain step records (dicts with the `step_samples` column names), so the
runner at an OOM, the dashboard and tests all get the same words from the same numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

BYTES_PER_MIB = 1024**2

# A batch this much longer than the median is called out as the likely trigger.
LONG_BATCH_RATIO = 1.5
# A trend is a leak when it is this steady (R² of a least-squares line) ...
LEAK_MIN_R2 = 0.8
# ... grows at least this much in total over the window ...
LEAK_MIN_GROWTH_BYTES = 16 * BYTES_PER_MIB
# ... and over at least this many steps.
LEAK_MIN_STEPS = 8
LEAK_WINDOW_STEPS = 50


@dataclass(frozen=True)
class Finding:
    """The headline sentence, and the numbers behind it for screens that want to chart them."""

    text: str
    details: dict = field(default_factory=dict)


def _mib(value: float) -> str:
    return f"{value / BYTES_PER_MIB:,.1f} MiB"


def _slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of ys over xs and its R²."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - mean_y) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return 0.0, 0.0
    return sxy / sxx, sxy * sxy / (sxx * syy)


def memory_trend(steps: Sequence[dict]) -> dict | None:
    """A steady growth of live memory across steps: allocated bytes on CUDA, RSS elsewhere."""
    key = "allocated_bytes" if any(s.get("allocated_bytes") is not None for s in steps) else "rss_bytes"
    window = [s for s in steps[-LEAK_WINDOW_STEPS:] if s.get(key) is not None]
    if len(window) < LEAK_MIN_STEPS:
        return None
    slope, r2 = _slope([s["step"] for s in window], [s[key] for s in window])
    growth = window[-1][key] - window[0][key]
    if slope <= 0 or r2 < LEAK_MIN_R2 or growth < LEAK_MIN_GROWTH_BYTES:
        return None
    return {
        "metric": key,
        "bytes_per_step": slope,
        "r2": r2,
        "since_step": window[0]["step"],
        "growth_bytes": growth,
    }


def explain_failure(failing_step: int | None, seq_len: int | None, steps: Sequence[dict]) -> Finding:
    """One finding for an OOM at `failing_step` with a batch of `seq_len` tokens per row."""
    details: dict = {"failing_step": failing_step, "failing_seq_len": seq_len, "steps_before": len(steps)}
    sentences: list[str] = []

    lengths = [s["seq_len"] for s in steps if s.get("seq_len")]
    if seq_len and lengths:
        median = statistics.median(lengths)
        ratio = seq_len / median
        details.update(median_seq_len=median, seq_len_ratio=ratio, longest_before=max(lengths))
        if ratio >= LONG_BATCH_RATIO:
            longest = " and the longest so far" if seq_len > max(lengths) else ""
            sentences.append(
                f"this batch was {seq_len:,} tokens, {ratio:.1f}x the median of {median:,.0f}{longest}: "
                "the long batch triggered it"
            )

    trend = memory_trend(steps)
    if trend is not None:
        details["trend"] = trend
        what = "allocated memory" if trend["metric"] == "allocated_bytes" else "process memory (RSS)"
        sentences.append(
            f"{what} grew {_mib(trend['bytes_per_step'])} per step since step {trend['since_step']} "
            f"({_mib(trend['growth_bytes'])} in all, R² {trend['r2']:.2f}): "
            "a leak, something keeps tensors across steps"
        )

    retries = [s.get("num_alloc_retries") for s in steps if s.get("num_alloc_retries") is not None]
    if len(retries) >= 2 and retries[-1] > retries[0]:
        details["alloc_retries_before"] = retries[-1] - retries[0]
        sentences.append(
            f"the allocator flushed its cache and retried {retries[-1] - retries[0]} time(s) in the steps before: "
            "memory was already at the limit"
        )

    if not sentences:
        if not steps:
            sentences.append(
                "it failed in the first step: this configuration's peak does not fit at all, whatever the batch"
            )
        else:
            sentences.append(
                f"memory was steady over {len(steps)} steps and the batch was typical: "
                "a peak inside the step exceeded the budget"
            )
    text = "; ".join(sentences)
    return Finding(text[0].upper() + text[1:] + ".", details)
