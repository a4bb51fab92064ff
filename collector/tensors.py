"""Device-independent tensor accounting: what parameters, gradients, optimizer states and saved
activations hold, counted from the tensors themselves.

This is what gives a CPU run (no caching allocator, no memory_stats) a real memory breakdown,
and what a CUDA run's allocator totals are split by. Storage is counted once however many
tensors view it (tied embeddings, `weight.t()` saved for backward, views of one buffer).
Nothing here reads tensor values, so nothing here synchronises a device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[torch.device, int]:
    # data_ptr alone is not unique across devices (CPU and CUDA address spaces overlap).
    return tensor.device, tensor.untyped_storage().data_ptr()


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameter bytes, trainable parameter bytes). Constant across a run: compute once."""
    params = list(model.parameters())
    return unique_storage_bytes(params), unique_storage_bytes(p for p in params if p.requires_grad)


def gradient_bytes(parameters: Iterable[torch.Tensor]) -> int:
    """Bytes held by `.grad` tensors now; call after the last backward, before zero_grad.
    Pass the trainable parameters, listed once: walking a peft model's modules each step costs
    more than the count itself."""
    return unique_storage_bytes(p.grad for p in parameters if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: exp_avg, exp_avg_sq, step)."""

    def state_tensors() -> Iterator[torch.Tensor]:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value

    return unique_storage_bytes(state_tensors())


class ActivationCounter:
    """Counts the bytes autograd saves for backward during a forward pass.

    Uses `saved_tensors_hooks`, so it sees exactly what backward will need, including what
    gradient checkpointing keeps (the checkpointed layers' inputs) and excluding what it drops.
    Parameters (and their views) are excluded: they are held anyway. The hook returns the tensor
    unchanged, so it changes no memory; its cost is one dict lookup per saved tensor.
    """

    def __init__(self, model: torch.nn.Module):
        self._excluded = {_storage_key(p) for p in model.parameters()}
        self._seen: set[tuple[torch.device, int]] = set()
        self._bytes = 0
        self.peak_bytes = 0
        # Set on profiled steps: who is saving (the innermost module) and the bytes per module.
        self.attribute_to: Callable[[], str | None] | None = None
        self.per_module: dict[str, int] | None = None

    @property
    def current_bytes(self) -> int:
        """Saved so far by the forward in progress (what a failure mid-forward had built up)."""
        return self._bytes

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if key not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self._bytes += storage.nbytes()
            if self.per_module is not None and self.attribute_to is not None:
                module = self.attribute_to() or "(top level: logits, loss)"
                self.per_module[module] = self.per_module.get(module, 0) + storage.nbytes()
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Wrap one micro-batch's forward; its saved bytes update `peak_bytes` on exit."""
        self._seen.clear()
        self._bytes = 0
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            # Drop the pointers: they must not pin anything nor match a later, unrelated storage.
            # (_bytes stays: a failure mid-forward reads it as current_bytes.)
            self._seen.clear()

    def take_peak(self) -> int:
        """The largest micro-batch total since the last call (one optimizer step), then reset."""
        peak, self.peak_bytes = self.peak_bytes, 0
        return peak
