"""The per-step collector: turns one optimizer step into one `StepSample` on the sink.

Independent of how the model is trained: the runner's loop and (later) an HF Trainer callback
call the same four methods. Per step it costs one `memory_stats()` call on CUDA, one read of
/proc for RSS and a walk over the gradients; optimizer states are walked when they can have
changed and activations counted when a batch shape is new or due a recount (collector.tensors).
It never reads a tensor's value on the step's critical path. The loss is copied to host memory
without blocking and read once the copy has completed, so a sample can reach the sink a step or
two late on CUDA.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from collector.allocator import allocated_bytes_now, allocator_probe_for
from collector.host import HostProbe
from collector.layers import LayerProfiler
from collector.readings import HostReading, LayerReading, StepSample, TensorBreakdown
from collector.tensors import (
    ActivationCounter,
    OptimizerStateMeter,
    gradient_bytes,
    optimizer_state_bytes,
    parameter_bytes,
)
from collector.whereabouts import Position, Whereabouts

RECENT_STEPS_KEPT = 50


class _PendingLoss:
    """A loss being copied device→host; `value()` is None until the copy has landed."""

    def __init__(self, loss: torch.Tensor | None):
        self._event = None
        if loss is None:
            self._host = None
        elif loss.device.type == "cuda":
            self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self._host.copy_(loss.detach().float(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = loss.detach().float()

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def value(self) -> float | None:
        if self._host is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        return float(self._host)


@dataclass
class _PendingSample:
    loss: _PendingLoss
    build: Callable[[float | None], StepSample]


class StepMonitor:
    """The loop calls `begin_step`, `enter(phase)` at each phase change, `set_batch` per
    micro-batch, wraps each forward in `forward()`, calls `after_backward` before the optimizer
    step and `end_step` after it; `close()` publishes what is pending.

    With `track_modules`, module hooks keep the current module known (for post-mortems) and
    profiled steps publish one LayerReading per module.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        publish: Callable[[StepSample | LayerReading], object],
        *,
        track_activations: bool = True,
        track_modules: bool = False,
        layer_profile_steps: int = 0,
        layer_profile_every: int = 0,
        activation_recount_every: int = 1,
    ):
        self._model = model
        self._optimizer = optimizer
        self._publish = publish
        self._allocator = allocator_probe_for(device)
        self._host = HostProbe()
        self._activations = ActivationCounter(model) if track_activations else None
        self._activation_recount_every = max(1, activation_recount_every)
        self._recount_activations = True
        self._batch_shape: tuple[int, int] | None = None
        self._optimizer_states = OptimizerStateMeter(optimizer)
        self._parameter_bytes, self._trainable_bytes = parameter_bytes(model)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._pending: deque[_PendingSample] = deque()
        self._step_started = 0.0
        self._gradient_bytes = 0
        self.where = Whereabouts()
        self.recent_steps: deque[StepSample] = deque(maxlen=RECENT_STEPS_KEPT)
        self.profiler: LayerProfiler | None = None
        if track_modules:
            self.where.track_modules(model)
            if self._activations is not None and (layer_profile_steps or layer_profile_every):
                self.profiler = LayerProfiler(
                    self._activations,
                    self.where,
                    device,
                    first_steps=layer_profile_steps,
                    every=layer_profile_every,
                    allocated_now=(lambda: allocated_bytes_now(device)) if device.type == "cuda" else None,
                )

    def begin_step(self, step: int) -> None:
        self._step_started = time.perf_counter()
        self._recount_activations = step % self._activation_recount_every == 0
        self.where.enter("data", step=step, micro_batch=0)
        if self.profiler is not None and self.profiler.due(step):
            self.profiler.start(step)

    def enter(self, phase: str, micro_batch: int | None = None) -> None:
        self.where.enter(phase, micro_batch=micro_batch)

    def set_batch(self, batch_size: int, seq_len: int) -> None:
        self.where.set_batch(batch_size, seq_len)
        self._batch_shape = (batch_size, seq_len)

    def forward(self) -> AbstractContextManager[None]:
        """Context for one micro-batch's forward pass (counts the activations it saves)."""
        self.where.enter("forward")
        if self._activations is None:
            return nullcontext()
        return self._activations.forward(self._batch_shape, recount=self._recount_activations)

    def after_backward(self) -> None:
        """Gradients are complete now and are freed by zero_grad after the optimizer step."""
        self._gradient_bytes = gradient_bytes(self._trainable)

    # --- what a post-mortem reads --------------------------------------------------------
    def position(self, error: BaseException | None = None) -> Position:
        """Where the step is; given the failure, with the module stack its traceback shows."""
        return self.where.position_at(error)

    def _breakdown(self, gradients: int, optimizer_states: int, activations: int | None) -> TensorBreakdown:
        return TensorBreakdown(
            parameter_bytes=self._parameter_bytes,
            trainable_parameter_bytes=self._trainable_bytes,
            gradient_bytes=gradients,
            optimizer_state_bytes=optimizer_states,
            activation_bytes=activations,
        )

    def breakdown_now(self) -> TensorBreakdown:
        """The tensors as they are at this moment (a failure mid-step): gradients counted now,
        activations saved so far by the forward in progress (None if it was not being counted)."""
        return self._breakdown(
            gradient_bytes(self._trainable),
            optimizer_state_bytes(self._optimizer),
            self._activations.current_bytes if self._activations else None,
        )

    def host_now(self) -> HostReading:
        return self._host.sample()

    def layer_profile(self) -> tuple[LayerReading, ...]:
        """The latest profile; the step in progress if it is being profiled."""
        return self.profiler.readings_so_far() if self.profiler else ()

    def end_step(self, step: int, loss: torch.Tensor | None, tokens: int, seq_len: int) -> None:
        step_seconds = time.perf_counter() - self._step_started
        wall_time = time.time()
        allocator = self._allocator.sample_and_reset() if self._allocator else None
        tensors = self._breakdown(
            self._gradient_bytes,
            self._optimizer_states.read(),
            self._activations.take_peak() if self._activations else None,
        )
        host = self._host.sample()
        if self.profiler is not None and self.profiler.active:
            for reading in self.profiler.finish():
                self._publish(reading)

        def build(loss_value: float | None) -> StepSample:
            return StepSample(
                step=step,
                wall_time=wall_time,
                loss=loss_value,
                tokens=tokens,
                seq_len=seq_len,
                step_seconds=step_seconds,
                tokens_per_s=tokens / step_seconds if step_seconds > 0 else None,
                allocator=allocator,
                tensors=tensors,
                host=host,
            )

        self._pending.append(_PendingSample(_PendingLoss(loss), build))
        self._publish_ready(wait=False)

    def _publish_ready(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].loss.ready()):
            pending = self._pending.popleft()
            sample = pending.build(pending.loss.value())
            self.recent_steps.append(sample)
            self._publish(sample)

    def close(self) -> None:
        """Publish every pending sample (waits for outstanding loss copies)."""
        self._publish_ready(wait=True)
        self._host.close()
