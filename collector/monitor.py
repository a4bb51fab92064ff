"""The per-step collector: turns one optimizer step into one `StepSample` on the sink.

Independent of how the model is trained: the runner's loop and (later) an HF Trainer callback
call the same four methods. Per step it costs one `memory_stats()` call on CUDA, one read of
/proc for RSS, and a walk over parameters and optimizer state; it never reads a tensor's value
on the step's critical path. The loss is copied to host memory without blocking and read once
the copy has completed, so a sample can reach the sink a step or two late on CUDA.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from collector.allocator import allocator_probe_for
from collector.host import HostProbe
from collector.readings import StepSample, TensorBreakdown
from collector.tensors import ActivationCounter, gradient_bytes, optimizer_state_bytes, parameter_bytes


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
    """Call `begin_step`, wrap each micro-batch forward in `forward()`, call `after_backward`
    before the optimizer step, and `end_step` after it; `close()` publishes what is pending."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        publish: Callable[[StepSample], object],
        *,
        track_activations: bool = True,
    ):
        self._model = model
        self._optimizer = optimizer
        self._publish = publish
        self._allocator = allocator_probe_for(device)
        self._host = HostProbe()
        self._activations = ActivationCounter(model) if track_activations else None
        self._parameter_bytes, self._trainable_bytes = parameter_bytes(model)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._pending: deque[_PendingSample] = deque()
        self._step_started = 0.0
        self._gradient_bytes = 0

    def begin_step(self) -> None:
        self._step_started = time.perf_counter()

    def forward(self) -> AbstractContextManager[None]:
        """Context for one micro-batch's forward pass (counts the activations it saves)."""
        return self._activations.forward() if self._activations else nullcontext()

    def after_backward(self) -> None:
        """Gradients are complete now and are freed by zero_grad after the optimizer step."""
        self._gradient_bytes = gradient_bytes(self._trainable)

    def end_step(self, step: int, loss: torch.Tensor | None, tokens: int, seq_len: int) -> None:
        step_seconds = time.perf_counter() - self._step_started
        wall_time = time.time()
        allocator = self._allocator.sample_and_reset() if self._allocator else None
        tensors = TensorBreakdown(
            parameter_bytes=self._parameter_bytes,
            trainable_parameter_bytes=self._trainable_bytes,
            gradient_bytes=self._gradient_bytes,
            optimizer_state_bytes=optimizer_state_bytes(self._optimizer),
            activation_bytes=self._activations.take_peak() if self._activations else None,
        )
        host = self._host.sample()

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
            self._publish(pending.build(pending.loss.value()))

    def close(self) -> None:
        """Publish every pending sample (waits for outstanding loss copies)."""
        self._publish_ready(wait=True)
