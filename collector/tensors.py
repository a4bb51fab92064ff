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


class OptimizerStateMeter:
    """`optimizer_state_bytes`, walked again only when it can have changed.

    Optimizers allocate their states at the first step that sees a parameter and keep their sizes
    after (AdamW, Adafactor, SGD momentum, bitsandbytes' 8-bit and paged states), so the walk,
    which grows linearly with the trainable tensors (28 µs for the tiny Llama's 8 adapted matrices
    on the CPU machine; a 7B model with LoRA on every linear has 448), is repeated when the number of
    parameters holding state changes and every `recount_every` reads otherwise, which catches an
    optimizer that resizes a state in place.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, recount_every: int = 50):
        self._optimizer = optimizer
        self._recount_every = max(1, recount_every)
        self._reads = 0
        self._entries = -1
        self._bytes = 0

    def read(self) -> int:
        entries = len(self._optimizer.state)
        if entries != self._entries or self._reads % self._recount_every == 0:
            self._entries = entries
            self._bytes = optimizer_state_bytes(self._optimizer)
        self._reads += 1
        return self._bytes


# The batch shape a forward ran on, as the loop knows it: (batch size, sequence length).
BatchShape = tuple[int, ...]


class ActivationCounter:
    """Counts the bytes autograd saves for backward during a forward pass.

    Uses `saved_tensors_hooks`, so it sees exactly what backward will need, including what
    gradient checkpointing keeps (the checkpointed layers' inputs) and excluding what it drops.
    Parameters (and their views) are excluded: they are held anyway. The hook returns the tensor
    unchanged, so it changes no memory.

    The hooks themselves are the cost: autograd wraps every saved tensor for Python and calls back
    on pack and unpack, ~5 µs a tensor, 1.5% of a 25 ms step of the tiny Llama (74 tensors). What a
    forward saves is fixed by its batch shape for the models trained here (dropout masks and
    checkpointed inputs have the shape of their inputs), so a shape is counted the first time it
    is seen and again whenever the caller asks (`recount`, every Nth step and on profiled steps);
    in between the shape's last count is carried. A recount that disagrees (routing in a mixture
    of experts, data-dependent shapes) marks the shape as varying, and it is counted on every
    forward from then on.
    """

    def __init__(self, model: torch.nn.Module):
        self._excluded = {_storage_key(p) for p in model.parameters()}
        self._seen: set[tuple[torch.device, int]] = set()
        self._bytes = 0
        self._counting = False
        self._in_uncounted_forward = False
        self._by_shape: dict[BatchShape, int] = {}
        self.varying_shapes: set[BatchShape] = set()
        self.peak_bytes = 0
        self.counted_forwards = 0
        self.carried_forwards = 0
        # Set on profiled steps: who is saving (the innermost module) and the bytes per module.
        self.attribute_to: Callable[[], str | None] | None = None
        self.per_module: dict[str, int] | None = None

    @property
    def current_bytes(self) -> int | None:
        """Saved so far by the forward in progress (what a failure mid-forward had built up);
        None inside a forward that is not being counted: how far it got is not known."""
        return None if self._in_uncounted_forward else self._bytes

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

    def _must_count(self, shape: BatchShape | None, recount: bool) -> bool:
        return (
            recount
            or shape is None
            or self.per_module is not None
            or shape not in self._by_shape
            or shape in self.varying_shapes
        )

    @contextmanager
    def forward(self, shape: BatchShape | None = None, *, recount: bool = False) -> Iterator[None]:
        """Wrap one micro-batch's forward; its saved bytes update `peak_bytes` on exit.

        `shape` None counts every forward (no carrying)."""
        if not self._must_count(shape, recount):
            self._in_uncounted_forward = True
            completed = False
            try:
                yield
                completed = True
            finally:
                self._in_uncounted_forward = False
                if completed:
                    # The forward finished: it saved what this shape saves (a backward failure
                    # after it reads that as current_bytes).
                    self._bytes = self._by_shape[shape]
                    self.peak_bytes = max(self.peak_bytes, self._bytes)
                    self.carried_forwards += 1
            return
        self._seen.clear()
        self._bytes = 0
        completed = False
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
            completed = True
        finally:
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            # Drop the pointers: they must not pin anything nor match a later, unrelated storage.
            # (_bytes stays: a failure mid-forward reads it as current_bytes.)
            self._seen.clear()
        self.counted_forwards += 1
        if completed and shape is not None:
            known = self._by_shape.get(shape)
            if known is not None and known != self._bytes:
                self.varying_shapes.add(shape)
            self._by_shape[shape] = self._bytes

    def take_peak(self) -> int:
        """The largest micro-batch total since the last call (one optimizer step), then reset."""
        peak, self.peak_bytes = self.peak_bytes, 0
        return peak
