"""The CPU allocator's own peak over the runner's real step: the reference the traced estimator
and the chunked loss are held to on a machine without a GPU.

The profiler's memory events carry the allocator's running total at each allocation, internal
temporaries of composite ops included (which a dispatch-level tracker cannot see). Shared by
tests/diagnosis/test_traced.py, tests/trainer/test_chunked_loss.py and bench.chunked_loss.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from collector.tensors import unique_storage_bytes
from trainer.config import RunConfig
from trainer.loop import setup, train


class _StepMarker:
    """The loop's monitor interface, marking the last step for the profiler and nothing else."""

    def __init__(self, last_step: int):
        self._last_step = last_step
        self._mark = record_function("oomlens.measured_step")

    def begin_step(self, step: int) -> None:
        if step == self._last_step:
            self._mark.__enter__()

    def end_step(self, step: int, *_args) -> None:
        if step == self._last_step:
            self._mark.__exit__(None, None, None)

    def enter(self, *_args, **_kwargs) -> None: ...

    def set_batch(self, *_args) -> None: ...

    def forward(self):
        return nullcontext()

    def after_backward(self) -> None: ...


def _allocation_events(nodes, events: list, marks: list) -> None:
    for node in nodes:
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
        elif node.name == "oomlens.measured_step":
            marks.append((node.start_time_ns, node.end_time_ns))
        _allocation_events(node.children, events, marks)


def cpu_allocator_peak(cfg: RunConfig) -> int:
    """Peak bytes allocated during the runner's second step, from the CPU allocator itself.

    The allocator reports a running total of what it allocated while profiling, in this session
    and earlier ones (what those freed after profiling stopped is never subtracted): the total
    before the session's first allocation is taken off, and the weights and buffers, allocated
    before the session, are added.
    """
    training = setup(cfg, torch.device("cpu"))
    model = training.built.model
    before = unique_storage_bytes([*model.parameters(), *model.buffers()])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train(training, _StepMarker(last_step=cfg.train.max_steps))
    events: list = []
    marks: list = []
    _allocation_events(prof.profiler.kineto_results.experimental_event_tree(), events, marks)
    ((start, end),) = marks
    events.sort()
    _, first_total, first_size = events[0]
    stale = first_total - first_size
    return before - stale + max(total for time, total, _size in events if start <= time <= end)
