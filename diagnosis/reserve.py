"""The CUDA caching allocator's reserve at the peak: peak reserved − peak allocated.

Nothing in a config decides it: the allocator keeps freed blocks cached and splits segments as the
run's sequence of requests allows, so it is taken from measurements, not derived. The measurements
are real memory snapshots recorded by other people on real GPUs (`tests/fixtures/snapshots/`, the
team's shared set), read with `diagnosis.snapshot`: for each, the trace's highest reserved figure
over its highest allocated figure, which is what `max_memory_reserved() / max_memory_allocated()`
reports for the same stretch.

Which snapshots count: those whose allocation trace contains a peak of at least 1 GiB. Left out:
peaks of megabytes (JasperSolt, HugePandaCoder: a 20 MiB segment is a fifth of them, which says
nothing about a fine-tune), a trace of one event (Yiyi-philosophy: the state at the dump, not a
peak), and snapshots without a trace (Muduard, albi2, SunnySood80, volcengine).

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
    fixture: str
    source: str
    what_ran: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int

    @property
    def ratio(self) -> float:
        return self.peak_reserved_bytes / self.peak_allocated_bytes


# The figures are `diagnosis.snapshot`'s reading of each file
# (tests/diagnosis/test_reserve.py reads them again and compares).
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
)

_RATIOS = sorted(m.ratio for m in RESERVE_MEASUREMENTS)
RESERVE_FRACTION = statistics.median(_RATIOS) - 1
RESERVE_FRACTION_RANGE = (_RATIOS[0] - 1, _RATIOS[-1] - 1)

SRC_RESERVE = (
    f"median peak reserved / peak allocated of {len(RESERVE_MEASUREMENTS)} real CUDA snapshots with a traced peak "
    f"≥ 1 GiB (diagnosis/reserve.py): " + ", ".join(f"{r - 1:+.1%}" for r in _RATIOS)
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
        f"snapshots, which range {low:.1%} to {high:.1%}; a run whose estimate is within that margin of the "
        "capacity may or may not fit (expandable_segments reserves less)"
    )
