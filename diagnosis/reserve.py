"""The CUDA caching allocator's reserve at the peak: peak reserved − peak allocated.

Nothing in a config decides it: the allocator keeps freed blocks cached and splits segments as the
run's sequence of requests allows, so it is taken from measurements, not derived. The measurements
are real memory snapshots recorded by other people on real GPUs (`tests/fixtures/snapshots/`, the
team's shared set), read with `diagnosis.snapshot`: for each, the trace's highest reserved figure
over its highest allocated figure, which is what `max_memory_reserved() / max_memory_allocated()`
reports for the same stretch. Beside them, the runner's own training steps recorded on a lent GPU
(tests/fixtures/gpu/…/peaks.json, bench/gpu_record.py): `max_memory_reserved() /
max_memory_allocated()` over one steady-state step, peaks reset after warm-up.

Which count: those with a peak of at least 1 GiB. Left out: peaks of megabytes (JasperSolt,
HugePandaCoder, the recorded tiny models: a 20 MiB segment is a fifth of them, which says nothing
about a fine-tune), a trace of one event (Yiyi-philosophy: the state at the dump, not a peak), and
snapshots without a trace (Muduard, albi2, SunnySood80, volcengine).

The estimate applies the median ratio. Its spread is the model's error and is said with the
number: a run within that margin of its capacity may or may not fit. `expandable_segments:True`
(not among the measurements) maps memory in 2 MiB pages and should reserve less.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from diagnosis.estimate import Term


@dataclass(frozen=True)
class ReserveMeasurement:
    fixture: str  # a snapshot in tests/fixtures/snapshots, or a recording's peaks.json in tests/fixtures/gpu
    source: str
    what_ran: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    row: str | None = None  # the peaks.json row a recorded measurement comes from

    @property
    def ratio(self) -> float:
        return self.peak_reserved_bytes / self.peak_allocated_bytes


# The figures are `diagnosis.snapshot`'s reading of each snapshot and the recording's own numbers
# (tests/diagnosis/test_reserve.py reads them again and compares).
_H100_RECORDING = "torch-2.11.0-cu130-NVIDIA-H100-80GB-HBM3/peaks.json"
_H100_SOURCE = "oomlens' runner on an NVIDIA H100 80GB HBM3, torch 2.11.0+cu130 (bench/gpu_record.py, 2026-11-23)"
RESERVE_MEASUREMENTS = (
    ReserveMeasurement(
        "kkaitlyn111__cs336-a2-systems__9aa5e31a12__memory_ctx128_fullstep.pickle.gz",
        "kkaitlyn111/cs336-a2-systems @ 9aa5e31a12 : memory_ctx128_fullstep.pickle",
        "training step of a 3.4 B-parameter transformer LM (forward, backward, AdamW), fp32",
        54_802_667_524,
        61_111_009_280,
    ),
    ReserveMeasurement(
        "Wedsonlin__assignment2-systems__87b086417e__medium_128_training_memory_snapshot.pickle.gz",
        "Wedsonlin/assignment2-systems @ 87b086417e : results/medium_128_training_memory_snapshot.pickle",
        "training step of a 'medium' transformer LM with AdamW, context 128",
        7_013_335_044,
        7_235_174_400,
    ),
    ReserveMeasurement(
        "Maphsge4__select_n__1f2f548046__snapshot.pickle.gz",
        "Maphsge4/select_n @ 1f2f548046 : snapshot.pickle",
        "BERT inference (transformers' modeling_bert)",
        2_409_045_992,
        2_776_629_248,
    ),
    ReserveMeasurement(
        "shreyansh26__MLSys-Experiments__16debf2b19__profile_grad.pkl",
        "shreyansh26/MLSys-Experiments @ 16debf2b19 : model_memory_usage/profile_grad.pkl",
        "three forwards of one nn.Linear(10k → 50k), with and without grad",
        4_434_803_008,
        4_439_670_784,
    ),
    ReserveMeasurement(
        _H100_RECORDING,
        _H100_SOURCE,
        "LoRA r16 training step of llama-3.2-1b, bf16, sdpa, 2 x 2,048 tokens",
        15_174_653_952,
        16_397_631_488,
        row="llama-3.2-1b-lora-bf16-2k",
    ),
    ReserveMeasurement(
        _H100_RECORDING,
        _H100_SOURCE,
        "LoRA r16 training step of llama-3.2-1b, bf16, gradient checkpointing, 2 x 4,096 tokens",
        15_794_968_576,
        18_578_669_568,
        row="llama-3.2-1b-lora-bf16-4k-checkpointing",
    ),
    ReserveMeasurement(
        _H100_RECORDING,
        _H100_SOURCE,
        "full fine-tuning step of qwen2.5-0.5b, bf16, AdamW, 4 x 1,024 tokens",
        16_186_875_904,
        18_224_250_880,
        row="qwen2.5-0.5b-full-bf16-1k",
    ),
    ReserveMeasurement(
        _H100_RECORDING,
        _H100_SOURCE,
        "full fine-tuning step of llama-3.2-1b, fp32 weights with bf16 autocast, AdamW, 2 x 1,024 tokens",
        24_797_317_120,
        28_846_325_760,
        row="llama-3.2-1b-full-amp-1k",
    ),
)

_RATIOS = sorted(m.ratio for m in RESERVE_MEASUREMENTS)
RESERVE_FRACTION = statistics.median(_RATIOS) - 1
RESERVE_FRACTION_RANGE = (_RATIOS[0] - 1, _RATIOS[-1] - 1)

SRC_RESERVE = (
    f"median peak reserved / peak allocated of {len(RESERVE_MEASUREMENTS)} real CUDA measurements with a peak "
    f"≥ 1 GiB, snapshots recorded by others and the runner's own steps on an H100 (diagnosis/reserve.py): "
    + ", ".join(f"{r - 1:+.1%}" for r in _RATIOS)
)


def allocator_reserve_bytes(peak_allocated_bytes: int) -> int:
    """What the caching allocator holds beyond the live tensors at the peak, on CUDA."""
    return round(peak_allocated_bytes * RESERVE_FRACTION)


def reserve_shortfall_at_worst(peak_allocated_bytes: int, margin_bytes: int) -> int:
    """Bytes a `margin_bytes` to spare would lack if the reserve were the highest measured, not the
    median (0 when even that fits)."""
    worst = round(peak_allocated_bytes * RESERVE_FRACTION_RANGE[1]) - allocator_reserve_bytes(peak_allocated_bytes)
    return max(0, worst - margin_bytes)


def reserve_term(peak_allocated_bytes: int) -> Term:
    low, high = RESERVE_FRACTION_RANGE
    return Term(
        "caching allocator reserve at the peak",
        allocator_reserve_bytes(peak_allocated_bytes),
        f"{RESERVE_FRACTION:.1%} of peak allocated (measured {low:.1%} to {high:.1%})",
        SRC_RESERVE,
    )


def reserve_note() -> str:
    low, high = RESERVE_FRACTION_RANGE
    return (
        f"allocator reserve {RESERVE_FRACTION:.1%} of peak allocated: the median of {len(RESERVE_MEASUREMENTS)} real "
        f"CUDA measurements, which range {low:.1%} to {high:.1%}; a run whose estimate is within that margin of the "
        "capacity may or may not fit (expandable_segments reserves less)"
    )
