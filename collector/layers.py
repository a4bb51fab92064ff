"""Per-layer memory on sampled steps: activation bytes saved by each module, and on CUDA the
allocated bytes around each module's forward and backward.

Profiling costs a Python call per saved tensor and, on CUDA, one allocator lookup per module
boundary: too much for every step, so it runs on the first steps and then every N
(`monitor.layer_profile_steps`, `monitor.layer_profile_every`). The CUDA peaks are the largest
allocated figure seen at the module's own and its children's boundaries: a lower bound of the
true peak, which would need a reset of the allocator's peak counter per module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from collector.readings import LayerReading
from collector.tensors import ActivationCounter
from collector.whereabouts import Whereabouts


class LayerProfiler:
    def __init__(
        self,
        activations: ActivationCounter,
        where: Whereabouts,
        device: torch.device,
        *,
        first_steps: int,
        every: int,
        allocated_now: Callable[[], int] | None = None,
    ):
        self._activations = activations
        self._where = where
        self._first_steps = first_steps
        self._every = every
        self._allocated_now = allocated_now if device.type == "cuda" else None
        self._step: int | None = None
        self._forward_start: dict[str, int] = {}
        self._forward_delta: dict[str, int] = {}
        self._forward_peak: dict[str, int] = {}
        self._backward_peak: dict[str, int] = {}
        self._open: dict[str, str] = {}  # module → "forward" | "backward", while inside it
        self.last_profile: tuple[LayerReading, ...] = ()

    def due(self, step: int) -> bool:
        return step <= self._first_steps or (self._every > 0 and step % self._every == 0)

    def start(self, step: int) -> None:
        self._step = step
        self._where.detail(True)  # per-module bytes down to the projections, on this step only
        self._activations.per_module = {}
        self._activations.attribute_to = lambda: self._where.module
        if self._allocated_now is not None:
            for store in (self._forward_start, self._forward_delta, self._forward_peak, self._backward_peak):
                store.clear()
            self._where.listeners.append(self._on_boundary)

    def _on_boundary(self, event: str, name: str) -> None:
        allocated = self._allocated_now()
        phase, edge = event.split("_")
        if edge == "enter":
            self._open[name] = phase
            if phase == "forward":
                self._forward_start[name] = allocated
        else:
            self._open.pop(name, None)
            if phase == "forward" and name in self._forward_start:
                self._forward_delta[name] = allocated - self._forward_start[name]
        # Every module we are inside saw this figure.
        for module, module_phase in self._open.items():
            peaks = self._forward_peak if module_phase == "forward" else self._backward_peak
            peaks[module] = max(peaks.get(module, 0), allocated)
        peaks = self._forward_peak if phase == "forward" else self._backward_peak
        peaks[name] = max(peaks.get(name, 0), allocated)

    def readings_so_far(self) -> tuple[LayerReading, ...]:
        """The step in progress as far as it got (a post-mortem's view of the failing step)."""
        if self._step is None:
            return self.last_profile
        per_module = self._activations.per_module or {}
        names = set(per_module) | set(self._forward_delta) | set(self._backward_peak)
        return tuple(
            LayerReading(
                step=self._step,
                module=name,
                activation_bytes=per_module.get(name, 0),
                forward_alloc_delta_bytes=self._forward_delta.get(name),
                forward_peak_bytes=self._forward_peak.get(name),
                backward_peak_bytes=self._backward_peak.get(name),
            )
            for name in sorted(names)
        )

    def finish(self) -> tuple[LayerReading, ...]:
        """End the profiled step; returns its readings (also kept as `last_profile`)."""
        self.last_profile = self.readings_so_far()
        self._activations.per_module = None
        self._activations.attribute_to = None
        if self._on_boundary in self._where.listeners:
            self._where.listeners.remove(self._on_boundary)
        self._open.clear()
        self._step = None
        self._where.detail(False)
        return self.last_profile

    @property
    def active(self) -> bool:
        return self._step is not None
