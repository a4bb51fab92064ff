"""The traced estimator: the real transformers model runs one training step under fake tensors.

Formulas (`diagnosis.analytic`) must be written per architecture and miss what a model really
does (SwiGLU intermediates, `repeat_kv`, fp32 softmax upcasts, autocast weight copies, an
optimizer's temporaries). Tracing runs the code itself: the model is built on the `meta` device
exactly as `trainer.models.build_model` builds it (LoRA, gradient checkpointing, attention
implementation, dtype), materialised with `to_empty` inside `FakeTensorMode` (shapes, dtypes and
storages, no data: a 7B model costs no RAM), and stepped exactly as `trainer.loop.train` steps it.
A `TorchDispatchMode` sees every op's output; each storage is counted once, while a weak
reference to it lives, and labelled by what holds it (parameter, gradient, optimizer state,
saved for backward, logits/loss, transient). The same tracker runs on real tensors, which is how
the tests check it against a real CPU step.

Fake CUDA tensors need a CUDA build of torch, so tracing happens on the CPU: kernel choices are
the CPU's (see `_CPU_TRACE_NOTE`), except where CUDA's differ in what they keep and the choice can
be made from Python: for `device="cuda"` dropout takes the fused kernel (a 1-byte mask), SDPA
with attention dropout stays in a fused kernel (no scores kept) and the optimizer takes its
foreach implementation. The step runs twice and the second is reported: optimizer
states made by the first are alive during the second's forward, as in every step but the first.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diagnosis.analytic import (
    BNB_BLOCK,
    BNB_MIN_8BIT_SIZE,
    BNB_QMAP_BYTES,
    CUDA_BLOCK_BYTES,
    CUDA_CONTEXT_BYTES,
    SRC_BNB_8BIT,
    SRC_CONTEXT,
    fsdp_keeps_input_gradients,
    workspaces_term,
)
from diagnosis.estimate import BREAKDOWN_KEYS, MemoryEstimate, Term
from diagnosis.gpus import compute_capability_of
from diagnosis.libraries import CHECKPOINTING_LOST_AND_RESTORED, Libraries, LossLayout
from diagnosis.reserve import allocator_reserve_bytes, reserve_note, reserve_term
from diagnosis.sharding import Gathered, fsdp_strategy, gathered_parameter_bytes, shard_components, zero_stage
from trainer.chunked_loss import decoder_output, head_loss
from trainer.config import RunConfig

# CUDA_BLOCK_BYTES: the CUDA caching allocator hands out blocks in multiples of 512 bytes
# (kMinBlockSize in c10/cuda/CUDACachingAllocator.cpp, `round_size`); `allocated_bytes` counts the
# rounded sizes. The analytic mode rounds each tensor it counts by the same constant.
# A label only ever moves up this order: a tensor saved for backward that becomes a gradient is
# a gradient; the logits saved by the loss stay logits.
_RANK = {"transient": 0, "activations": 1, "logits_loss": 2, "optimizer_states": 3, "gradients": 4, "parameters": 5}
_BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
STEPS_TRACED = 2
_CPU_TRACE_NOTE = (
    "traced on the CPU: kernels are the CPU's (SDPA's CPU flash kernel where CUDA would pick flash or "
    "memory-efficient attention, CPU autocast op lists), and workspace inside fused kernels is not seen"
)
_CUDA_DROPOUT_NOTE = "dropout traced as CUDA runs it: the fused kernel, keeping a 1-byte mask"
_CUDA_SDPA_DROPOUT_NOTE = (
    "SDPA with attention dropout traced as CUDA runs it: a fused kernel (flash or memory-efficient) draws "
    "the dropout inside and keeps q, k, v, output and logsumexp, where the CPU falls back to the math kernel"
)


class TracedEstimateUnsupported(ValueError):
    """This config cannot be traced on the CPU; the analytic mode can still estimate it."""


def cuda_block_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator reserves for a request: 0 stays 0 (no block)."""
    return math.ceil(nbytes / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


def exact_bytes(nbytes: int) -> int:
    return nbytes


# --- live storages --------------------------------------------------------------------------


@dataclass
class _Block:
    nbytes: int
    category: str
    ref: weakref.ref
    on_host: bool = False  # counted as 0 from now on


class LiveBytes:
    """Live storages by category, the peak moment of each phase and each category's maximum.

    Keyed by the storage object (not `data_ptr`, which fake storages do not have); a weak
    reference's callback removes a storage when its last tensor dies, which is when the caching
    allocator gets the block back.
    """

    def __init__(self, block_bytes: Callable[[int], int] = exact_bytes):
        self._block_bytes = block_bytes
        self._blocks: dict[int, _Block] = {}
        self.current = dict.fromkeys(BREAKDOWN_KEYS, 0)
        self.total = 0
        self.reset_peak()

    def reset_peak(self) -> None:
        self.peaks: dict[str, dict[str, int]] = {}  # phase → breakdown at its largest total
        self.maxima = dict(self.current)

    def track(self, tensor: torch.Tensor, category: str, *, relabel: bool = True) -> int:
        """Count `tensor`'s storage if new, raise its label to `category` if higher (and `relabel`);
        its key."""
        storage = tensor.untyped_storage()
        key = id(storage)
        block = self._blocks.get(key)
        if block is None:
            nbytes = self._block_bytes(storage.nbytes())
            self._blocks[key] = _Block(nbytes, category, weakref.ref(storage, partial(self._free, key)))
            self._add(category, nbytes)
            return key
        if block.on_host:
            return key
        nbytes = self._block_bytes(storage.nbytes())
        if nbytes != block.nbytes:  # resized in place
            self._add(block.category, nbytes - block.nbytes)
            block.nbytes = nbytes
        if relabel and _RANK[category] > _RANK[block.category]:
            self._add(block.category, -block.nbytes)
            self._add(category, block.nbytes)
            block.category = category
        return key

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop counting a storage that is not on the device (AdamW's `step` counters live on the host)."""
        block = self._blocks.get(id(tensor.untyped_storage()))
        if block is not None:
            self._add(block.category, -block.nbytes)
            block.nbytes = 0
            block.on_host = True

    def bytes_of(self, key: int) -> int:
        block = self._blocks.get(key)
        return block.nbytes if block is not None else 0

    def bytes_of_keys(self, keys: set[int], category: str | None = None) -> int:
        return sum(
            block.nbytes
            for key in keys
            if (block := self._blocks.get(key)) is not None and category in (None, block.category)
        )

    def observe(self, phase: str) -> None:
        """Called after every op and relabelling: a phase's peak keeps a copy of the breakdown, the
        latest one of equal totals, whose labels are final (a gradient is labelled after the op
        that made it)."""
        for key, value in self.current.items():
            if value > self.maxima[key]:
                self.maxima[key] = value
        peak = self.peaks.get(phase)
        if peak is None or self.total >= sum(peak.values()):
            self.peaks[phase] = dict(self.current)

    def _add(self, category: str, nbytes: int) -> None:
        self.current[category] += nbytes
        self.total += nbytes

    def _free(self, key: int, _ref: weakref.ref) -> None:
        block = self._blocks.pop(key, None)
        if block is not None:
            self._add(block.category, -block.nbytes)


# --- the step tracer -------------------------------------------------------------------------


class StepTracer(TorchDispatchMode):
    """Labels every op output by where the step is: in the logits/loss region (forward from the
    LM head on, backward until the LM head's input has its gradient), recomputing a checkpointed
    layer in backward (its tensors are activations), or anywhere else (transient)."""

    def __init__(self, live: LiveBytes, softmax_backward_temporary: bool = False):
        super().__init__()
        self.live = live
        self.phase = "setup"
        self.in_logits = False
        self.recomputing = 0
        # CUDA's softmax backward makes `tmp = grad * output` before its kernel runs
        # (aten/src/ATen/native/cuda/SoftMax.cu, softmax_backward_cuda_out): one more b·a·s²
        # tensor at eager attention's backward peak, seen in the allocator's C++ stacks on an
        # H100 (torch 2.11). The CPU's kernel makes none.
        self.softmax_backward_temporary = softmax_backward_temporary

    def category(self) -> str:
        if self.in_logits:
            return "logits_loss"
        return "activations" if self.recomputing else "transient"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        temporary = None
        if self.softmax_backward_temporary and func is torch.ops.aten._softmax_backward_data.default:
            temporary = torch.empty_like(args[0])  # alive with the op's output, freed after it
            self.live.track(temporary, self.category())
        out = func(*args, **(kwargs or {}))
        category = self.category()
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                # The op that makes a storage names it. An op returning a view of an existing
                # storage (the LM head's `view` of the final norm's output, made outside the
                # logits region) does not rename it: only `_Observer.label` raises labels.
                self.live.track(leaf, category, relabel=False)
        self.live.observe(self.phase)
        return out


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: the longest ModuleList of one class (`model.layers`, GPT-2's `h`)."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            children = list(module)
            if len({type(child) for child in children}) == 1:
                best = children
    return best


@dataclass
class StepTrace:
    """What one traced step measured (the second of `STEPS_TRACED`)."""

    # Each phase's worst moment: the breakdown when its live total was largest.
    phase_peaks: dict[str, dict[str, int]]
    parameter_bytes: int
    trainable_parameter_bytes: int
    buffer_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    # As the runner's ActivationCounter counts: bytes saved for backward by one micro-batch's
    # forward through saved-tensor hooks (parameters excluded), the largest micro-batch.
    saved_activation_bytes: int
    # Saved by one decoder layer's forward, plus the input a checkpointed layer keeps (largest layer).
    per_layer_activation_bytes: int
    # Kept for backward by one micro-batch's forward outside the logits and loss, checkpointed
    # layers' inputs included (the analytic mode's "activations"), the largest micro-batch.
    activation_bytes: int
    maxima: dict[str, int] = field(default_factory=dict)
    # Optimizer states sized rather than traced (bitsandbytes).
    untraced_state_bytes: int = 0

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=lambda phase: sum(self.phase_peaks[phase].values()))

    @property
    def breakdown(self) -> dict[str, int]:
        return self.phase_peaks[self.peak_phase]

    @property
    def peak_bytes(self) -> int:
        return sum(self.breakdown.values())


class _Observer:
    """Hooks that tell the tracer what the step is doing; installed for the trace, removed after."""

    def __init__(self, model: torch.nn.Module, tracer: StepTracer):
        self.model = model
        self.tracer = tracer
        self.live = tracer.live
        self.layers = decoder_layers(model)
        self._layer: int | None = None
        self._seen: set[int] = set()  # saved by this micro-batch's forward, counted once
        self._kept: set[int] = set()  # attributed to a layer, counted once
        self.saved_bytes = 0
        self.saved_peak = 0
        self.per_layer = [0] * len(self.layers)  # this micro-batch's forward
        self.per_layer_peak = 0
        self.activation_peak = 0
        self.param_keys: set[int] = set()
        self.trainable_keys: set[int] = set()
        self.buffer_keys: set[int] = set()

    @contextmanager
    def installed(self) -> Iterator[None]:
        with ExitStack() as stack:
            self._track_weights()
            self._hook_logits(stack)
            self._hook_layers(stack)
            self._hook_gradients(stack)
            yield

    def _track_weights(self) -> None:
        params = list(self.model.parameters())
        self.param_keys = {self.live.track(p, "parameters") for p in params}
        self.trainable_keys = {id(p.untyped_storage()) for p in params if p.requires_grad}
        self.buffer_keys = {self.live.track(b, "parameters") for b in self.model.buffers()} - self.param_keys

    def _hook_logits(self, stack: ExitStack) -> None:
        head = self.model.get_output_embeddings()
        if head is None:
            return
        stack.enter_context(head.register_forward_pre_hook(self._enter_logits))

    def _enter_logits(self, _module: torch.nn.Module, args: tuple) -> None:
        self.tracer.in_logits = True
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            # Backward through the loss and the LM head ends when the head's input has its gradient.
            hidden.register_hook(self._leave_logits_backward)

    def _leave_logits_backward(self, _grad: torch.Tensor) -> None:
        self.tracer.in_logits = False

    def _hook_layers(self, stack: ExitStack) -> None:
        for index, layer in enumerate(self.layers):
            stack.enter_context(layer.register_forward_pre_hook(partial(self._enter_layer, index)))
            stack.enter_context(layer.register_forward_hook(self._leave_layer))
            checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
            if getattr(layer, "gradient_checkpointing", False) and checkpoint is not None:
                layer._gradient_checkpointing_func = partial(self._checkpointed, checkpoint, index)
                stack.callback(setattr, layer, "_gradient_checkpointing_func", checkpoint)

    def _enter_layer(self, index: int, _module: torch.nn.Module, _args: tuple) -> None:
        self._layer = index

    def _leave_layer(self, _module: torch.nn.Module, _args: tuple, _out: object) -> None:
        self._layer = None

    def _checkpointed(self, checkpoint: Callable, index: int, function: Callable, *args, **kwargs):
        """The layer's checkpoint, unchanged, with two observations: the inputs it keeps until
        backward are activations, and what it recomputes in backward is too."""
        if self.tracer.phase == "forward":
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    self._count_saved(arg, index)

        def recomputable(*inner_args, **inner_kwargs):
            if self.tracer.phase != "backward":
                return function(*inner_args, **inner_kwargs)
            self.tracer.recomputing += 1
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                self.tracer.recomputing -= 1

        return checkpoint(recomputable, *args, **kwargs)

    def _hook_gradients(self, stack: ExitStack) -> None:
        for param in self.model.parameters():
            if param.requires_grad:
                stack.enter_context(param.register_post_accumulate_grad_hook(self._gradient_ready))

    def label(self, tensor: torch.Tensor, category: str) -> int:
        """Label a tensor made by an earlier op; its key."""
        key = self.live.track(tensor, category)
        self.live.observe(self.tracer.phase)
        return key

    def _gradient_ready(self, param: torch.Tensor) -> None:
        self.label(param.grad, "gradients")

    # --- saved for backward -----------------------------------------------------------------
    @contextmanager
    def forward(self) -> Iterator[None]:
        """One micro-batch's forward, with the runner's saved-tensor accounting."""
        self._seen.clear()
        self._kept.clear()
        self.saved_bytes = 0
        self.per_layer = [0] * len(self.layers)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield
        finally:
            self.saved_peak = max(self.saved_peak, self.saved_bytes)
            self.per_layer_peak = max(self.per_layer_peak, *self.per_layer, 0)
            kept = self.live.bytes_of_keys(self._seen | self._kept, "activations")
            self.activation_peak = max(self.activation_peak, kept)
            self._seen.clear()
            self._kept.clear()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = self.label(tensor, "activations")
        if key not in self.param_keys and key not in self._seen:
            self._seen.add(key)
            self.saved_bytes += self.live.bytes_of(key)
        if self._layer is not None:
            self._keep(key, self._layer)
        return tensor

    def _keep(self, key: int, layer: int) -> None:
        if key not in self.param_keys and key not in self._kept:
            self._kept.add(key)
            self.per_layer[layer] += self.live.bytes_of(key)

    def _count_saved(self, tensor: torch.Tensor, index: int) -> None:
        """A checkpoint's input: kept for backward, but not through saved-tensor hooks."""
        self._keep(self.label(tensor, "activations"), index)

    def reset_peaks(self) -> None:
        self.saved_peak = 0
        self.per_layer_peak = 0
        self.activation_peak = 0


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# --- the step, as trainer.loop.train runs it -------------------------------------------------


class BitsandbytesStandIn:
    """A bitsandbytes optimizer's memory (bitsandbytes runs on CUDA only): the states it makes on
    the first step, sized by the analytic mode's rule, and an update in place.

    8-bit: two uint8 moments and an fp32 maximum per block of `BNB_BLOCK` each, 32-bit moments
    below `BNB_MIN_8BIT_SIZE` elements, the quantile maps. Paged states live in CUDA unified memory,
    outside the caching allocator, and are on the device while `step()` runs: they are made for
    the step and dropped after it, as the analytic mode counts them.
    """

    def __init__(self, params: list[torch.Tensor], name: str, lr: float):
        self.param_groups = [{"params": params, "lr": lr}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self._eight_bit = name.endswith("8bit")
        self._paged = name.startswith("paged")
        # Set by `trace_steps`: labels a state tensor and answers its device bytes.
        self.label: Callable[[torch.Tensor], int] = lambda _tensor: 0
        self.state_bytes = 0

    def _new_state(self, numel: int) -> dict[str, torch.Tensor]:
        if not self._eight_bit or numel < BNB_MIN_8BIT_SIZE:
            return {"state1": torch.empty(numel), "state2": torch.empty(numel)}
        blocks = math.ceil(numel / BNB_BLOCK)
        return {
            "state1": torch.empty(numel, dtype=torch.uint8),
            "state2": torch.empty(numel, dtype=torch.uint8),
            "absmax1": torch.empty(blocks),
            "absmax2": torch.empty(blocks),
            "qmaps": torch.empty(BNB_QMAP_BYTES, dtype=torch.uint8),
        }

    def step(self) -> None:
        (group,) = self.param_groups
        states = {p: self.state.get(p) or self._new_state(p.numel()) for p in group["params"]}
        self.state_bytes = sum(self.label(tensor) for state in states.values() for tensor in state.values())
        if not self._paged:
            self.state = states
        with torch.no_grad():
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad, alpha=-group["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.param_groups[0]["params"]:
            param.grad = None


OptimizerLike = torch.optim.Optimizer | BitsandbytesStandIn


class _ScalerWithoutSync:
    """GradScaler's memory without its host sync: `GradScaler.step` reads `found_inf.item()`,
    which fake tensors cannot answer. Scaling the loss and unscaling the gradients in place
    allocate what the real one does (a scaled loss, two scalars)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * 65536.0 if self.enabled else loss

    def step(self, optimizer: OptimizerLike) -> None:
        if self.enabled:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            found_inf = torch.zeros(1, device=grads[0].device)
            inv_scale = torch.full((1,), 1 / 65536.0, device=grads[0].device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        optimizer.step()


def _autocast(cfg: RunConfig) -> torch.autocast:
    mixed = cfg.train.mixed_precision
    return torch.autocast("cpu", dtype=_AUTOCAST_DTYPES.get(mixed, torch.bfloat16), enabled=mixed != "no")


MICRO_BATCHES_TRACED = 2


def loss_as_it_ran(head_output: list[torch.Tensor], labels: torch.Tensor, layout: LossLayout) -> torch.Tensor:
    """The causal-LM loss as a transformers before 4.49 computed it (SRC_TRANSFORMERS_OLD_LOSS).

    `head_output` is a one-item list that is emptied here: a forward that rebound `logits` to their
    fp32 copy (`keeps_head_output` False) dropped the last reference to the 16-bit ones, and so
    must this function."""
    logits = head_output.pop()
    read = logits.float() if layout.upcast else logits
    if not layout.keeps_head_output:
        del logits  # the forward's `logits = logits.float()`: the 16-bit head output is freed here
    shift_logits = read[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return torch.nn.functional.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))


@contextmanager
def _training_cache_kept(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """GPTBigCode before transformers 4.53 (SRC_GPT_BIGCODE_CACHE): each layer's `present` pins its
    c_attn output until the forward returns. Today's model keeps no cache in training, so the trace
    holds those outputs for it, from each c_attn's forward to the end of the loss."""
    if not enabled:
        yield
        return
    kept: list[object] = []
    handles = [
        module.register_forward_hook(lambda _module, _args, output: kept.append(output))
        for name, module in model.named_modules()
        if name.endswith("attn.c_attn")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        kept.clear()


def _chunked_loss(model: torch.nn.Module, ids: torch.Tensor, chunk_tokens: int, tracer: StepTracer) -> torch.Tensor:
    """The runner's chunked loss (trainer/chunked_loss.py), the head's part in the logits region:
    from the head's first chunk in forward until the decoder's output has its gradient."""
    hidden = decoder_output(model, ids)
    tracer.in_logits = True
    if hidden.requires_grad:
        hidden.register_hook(lambda _grad: setattr(tracer, "in_logits", False))
    return head_loss(model, hidden, ids, chunk_tokens)


def _one_step(
    model: torch.nn.Module,
    optimizer: OptimizerLike,
    scaler: _ScalerWithoutSync | torch.amp.GradScaler,
    cfg: RunConfig,
    observer: _Observer,
    input_ids: Callable[[], torch.Tensor],
    loss: LossLayout = LossLayout(),
    keep_cache: bool = False,
) -> None:
    """`trainer.loop.train`'s step, statement for statement, with the tracer told the phase.

    `loss` and `keep_cache`: how the transformers that runs the step computes the loss and whether
    it keeps a key/value cache in training, where it is not as today's (loss_as_it_ran,
    _training_cache_kept), so that an older transformers' step can be traced."""
    tracer, accum = observer.tracer, cfg.train.grad_accum_steps
    step_loss = None
    # From the second micro-batch on, every micro-batch meets the same memory (gradients already
    # accumulated, one micro-batch of activations): tracing two gives the step's peak, and a run
    # with 128 accumulation steps traces in seconds rather than an hour.
    for _ in range(min(accum, MICRO_BATCHES_TRACED)):
        tracer.phase = "forward"
        ids = input_ids()
        with _autocast(cfg), observer.forward(), _training_cache_kept(model, keep_cache):
            if cfg.train.loss_chunk_tokens:
                micro_loss = _chunked_loss(model, ids, cfg.train.loss_chunk_tokens, tracer) / accum
            elif loss.is_current:
                micro_loss = model(input_ids=ids, labels=ids).loss / accum
            else:
                micro_loss = loss_as_it_ran([model(input_ids=ids).logits], ids, loss) / accum
        tracer.phase = "backward"
        scaler.scale(micro_loss).backward()
        tracer.in_logits = False  # the head's input needed no gradient: nothing else turned it off
        step_loss = micro_loss.detach() if step_loss is None else step_loss + micro_loss.detach()
    tracer.phase = "optimizer"
    scaler.step(optimizer)
    if isinstance(scaler, torch.amp.GradScaler):
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _optimizer_state_tensors(optimizer: OptimizerLike) -> Iterator[tuple[str, torch.Tensor]]:
    for state in optimizer.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                yield name, value


def trace_steps(
    model: torch.nn.Module,
    optimizer: OptimizerLike,
    cfg: RunConfig,
    input_ids: Callable[[], torch.Tensor],
    *,
    block_bytes: Callable[[int], int] = exact_bytes,
    scaler: _ScalerWithoutSync | torch.amp.GradScaler | None = None,
    host_step_counters: bool = False,
    loss: LossLayout = LossLayout(),
    keep_cache: bool = False,
    softmax_backward_temporary: bool = False,
) -> StepTrace:
    """Run `STEPS_TRACED` training steps of `model` (fake or real tensors) and measure the last.

    `host_step_counters`: AdamW keeps its `step` counters on the host unless fused or capturable,
    so on CUDA they are no device memory. `softmax_backward_temporary`: count the temporary
    CUDA's softmax backward makes (StepTracer).
    """
    live = LiveBytes(block_bytes)
    tracer = StepTracer(live, softmax_backward_temporary)
    observer = _Observer(model, tracer)
    scaler = scaler or _ScalerWithoutSync(cfg.train.mixed_precision == "fp16")
    if isinstance(optimizer, BitsandbytesStandIn):
        optimizer.label = lambda tensor: live.bytes_of(observer.label(tensor, "optimizer_states"))
    with observer.installed(), tracer:
        for step in range(STEPS_TRACED):
            if step == STEPS_TRACED - 1:
                live.reset_peak()
                observer.reset_peaks()
            _one_step(model, optimizer, scaler, cfg, observer, input_ids, loss, keep_cache)
            for name, state in _optimizer_state_tensors(optimizer):
                live.track(state, "optimizer_states")
                if host_step_counters and name == "step" and state.dim() == 0:
                    live.forget(state)
        return _summary(live, observer, getattr(optimizer, "state_bytes", 0))


def _summary(live: LiveBytes, observer: _Observer, untraced_state_bytes: int) -> StepTrace:
    return StepTrace(
        phase_peaks=dict(live.peaks),
        parameter_bytes=live.bytes_of_keys(observer.param_keys),
        trainable_parameter_bytes=live.bytes_of_keys(observer.trainable_keys),
        buffer_bytes=live.bytes_of_keys(observer.buffer_keys),
        gradient_bytes=live.maxima["gradients"],
        optimizer_state_bytes=live.maxima["optimizer_states"],
        saved_activation_bytes=observer.saved_peak,
        per_layer_activation_bytes=observer.per_layer_peak,
        activation_bytes=observer.activation_peak,
        maxima=dict(live.maxima),
        untraced_state_bytes=untraced_state_bytes,
    )


# --- the estimate ------------------------------------------------------------------------------


def _config_path(name: str, workdir: Path) -> str:
    """A model name `build_model` can build without weights: presets and bare configs as they
    are, a checkpoint directory as its config.json, a hub id as its config.json fetched alone."""
    from trainer.models import has_weights, hf_config
    from trainer.presets import PRESETS

    if name in PRESETS:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path / "config.json") if has_weights(path) else str(path)
    config = hf_config(name)
    if config is None:
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise TracedEstimateUnsupported(f"model.name {name!r}: no config to trace ({error})") from error
        config.to_json_file(str(workdir / "config.json"))
        return str(workdir / "config.json")
    return name


def _check_traceable(cfg: RunConfig) -> None:
    if cfg.model.implementation != "transformers":
        raise TracedEstimateUnsupported(
            f"model.implementation {cfg.model.implementation}: the traced estimate builds the transformers model; "
            "use the analytic estimate (python -m diagnosis estimate, without --traced)"
        )
    if cfg.model.quantization != "none":
        raise TracedEstimateUnsupported(
            f"model.quantization {cfg.model.quantization}: bitsandbytes quantised weights cannot be traced "
            "on the CPU; use the analytic estimate (python -m diagnosis estimate, without --traced)"
        )


def build_fake_model(cfg: RunConfig) -> tuple[torch.nn.Module, FakeTensorMode, list[str]]:
    """The runner's model, built on `meta` by `build_model` itself, then given fake CPU storage.

    `get_peft_model` cannot run inside FakeTensorMode (torch 2.13 + peft 0.21: "Couldn't swap
    Linear.weight"), so everything is built on `meta` first and only `to_empty` runs inside it.
    """
    from trainer.models import build_model

    _check_traceable(cfg)
    notes: list[str] = []
    model_cfg = cfg.model
    if model_cfg.attn_implementation == "flash_attention_2":
        # flash-attn is CUDA only; SDPA's flash kernel saves the same O(s) output and log-sum-exp.
        model_cfg = model_cfg.model_copy(update={"attn_implementation": "sdpa"})
        notes.append("flash_attention_2 traced as sdpa (flash-attn has no CPU kernel); both save O(seq) per head")
    with tempfile.TemporaryDirectory(prefix="oomlens-traced-") as workdir:
        model_cfg = model_cfg.model_copy(update={"name": _config_path(cfg.model.name, Path(workdir))})
        with torch.device("meta"):
            model = build_model(model_cfg, cfg.lora, torch.device("meta")).model
    shared = _shared_parameters(model)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        model.to_empty(device="cpu")
    _retie(shared)
    return model, fake_mode, notes


def _shared_parameters(model: torch.nn.Module) -> list[list[tuple[torch.nn.Module, str]]]:
    """Where one parameter sits in several modules (tied input and output embeddings)."""
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name))
    return [places for places in owners.values() if len(places) > 1]


def _retie(shared: list[list[tuple[torch.nn.Module, str]]]) -> None:
    """`to_empty` gives each place of a shared parameter its own new tensor; tie them again."""
    for (first_module, first_name), *others in shared:
        param = getattr(first_module, first_name)
        for module, name in others:
            setattr(module, name, param)


def _optimizer(cfg: RunConfig, model: torch.nn.Module, on_cuda: bool) -> tuple[OptimizerLike, list[str]]:
    """The runner's optimizer as CUDA would run it; a stand-in for bitsandbytes'."""
    from trainer.loop import make_optimizer

    train = cfg.train
    if train.optimizer in _BITSANDBYTES_OPTIMIZERS:
        params = [p for p in model.parameters() if p.requires_grad]
        note = (
            f"{train.optimizer} (bitsandbytes, CUDA only) not traced: its states are sized by the analytic rule "
            "and its kernel's temporaries are left out"
        )
        if train.optimizer.startswith("paged"):
            note += "; paged states are counted while optimizer.step() runs only"
        return BitsandbytesStandIn(params, train.optimizer, train.lr), [note]
    optimizer = make_optimizer(train, model)
    if on_cuda and train.optimizer in ("adamw", "sgd"):
        # torch picks the foreach implementation for CUDA tensors: it steps all parameters at once,
        # with temporaries as large as a whole state (AdamW's sqrt(v) for every parameter).
        for group in optimizer.param_groups:
            group["foreach"] = True
        return optimizer, [f"{train.optimizer} traced with foreach=True, the default torch picks on CUDA"]
    return optimizer, []


# The trace patches transformers and torch process-wide (`_eager_transformers`, `_cuda_kernels`),
# and the dashboard runs each browser session in a thread of one process: two traces at once would
# restore each other's patches mid-trace. One at a time; a second waits (seconds to a minute).
_TRACE_LOCK = threading.Lock()


def estimate_traced(
    cfg: RunConfig,
    *,
    device: str = "cuda",
    bitsandbytes: str | None = None,
    transformers: str | None = None,
    torch: str | None = None,
    gpu: str | None = None,
) -> MemoryEstimate:
    """Peak allocated bytes of one training step of `cfg` on `device` ("cuda" or "cpu"), traced.

    The versions are taken as the analytic estimator takes them. Quantised configs are refused here
    (bitsandbytes cannot run under fake tensors on the CPU), so no bitsandbytes changes a trace; the
    trace runs no FSDP, so what FSDP1 keeps under a transformers that checkpoints reentrantly is
    only named in a note."""
    libraries = Libraries.that_run(bitsandbytes=bitsandbytes, transformers=transformers, torch=torch)
    with _TRACE_LOCK:
        estimate = _estimate_traced(cfg, device, libraries, compute_capability_of(gpu))
    if fsdp_keeps_input_gradients(cfg, libraries.checkpoints_reentrantly):
        note = (
            "FSDP1 under reentrant checkpointing keeps every layer's input gradient to the end of backward: "
            "not in this trace (the analytic estimate counts it)"
        )
        estimate = dataclasses.replace(estimate, notes=(*estimate.notes, note))
    return estimate


def _estimate_traced(
    cfg: RunConfig, device: str, libraries: Libraries, capability: tuple[int, int] | None
) -> MemoryEstimate:
    on_cuda = device.startswith("cuda")
    try:
        with _eager_transformers(), _cuda_kernels(libraries) if on_cuda else nullcontext():
            trace, notes = _trace_fake(cfg, on_cuda, libraries)
    except DataDependentOutputException:
        # An architecture that reads tensor values where the runner's inputs would have answered;
        # its tracing path needs no values, at the price of the causal mask it materialises.
        with _cuda_kernels(libraries) if on_cuda else nullcontext():
            trace, notes = _trace_values_free(cfg, on_cuda, libraries)
        notes.append("traced along transformers' tracing path: it builds a causal mask the runner may skip")
    return _estimate(trace, cfg, on_cuda, notes, _workspaces(cfg, libraries, capability) if on_cuda else None)


def _workspaces(cfg: RunConfig, libraries: Libraries, capability: tuple[int, int] | None) -> Term:
    from diagnosis.architecture import ArchitectureError, shape_for

    try:
        shape = shape_for(cfg.model.name)
    except ArchitectureError:  # an architecture the analytic table lacks still traces
        shape = None
    return workspaces_term(shape, cfg.model.quantization, libraries, capability)


def _trace_values_free(cfg: RunConfig, on_cuda: bool, libraries: Libraries) -> tuple[StepTrace, list[str]]:
    try:
        return _trace_fake(cfg, on_cuda, libraries)
    except (DataDependentOutputException, DynamicOutputShapeException) as error:
        raise TracedEstimateUnsupported(
            f"model.name {cfg.model.name!r}: its step depends on tensor values ({error.func}), which fake tensors "
            "do not have; use the analytic estimate (python -m diagnosis estimate, without --traced)"
        ) from error


def _trace_fake(cfg: RunConfig, on_cuda: bool, libraries: Libraries) -> tuple[StepTrace, list[str]]:
    model, fake_mode, notes = build_fake_model(cfg)
    batch, seq_len = cfg.train.micro_batch_size, cfg.data.seq_len
    vocab = model.get_input_embeddings().num_embeddings
    model_type = model.config.model_type
    loss = libraries.loss_layout(model_type)
    if not loss.is_current:
        how = "fp32 logits" if loss.upcast else "the logits in their own dtype, no fp32 upcast"
        notes.append(
            f"loss traced as transformers {libraries.transformers} computes it for {model_type}: cross-entropy over "
            f"a shifted copy of {how}"
            + ("" if loss.keeps_head_output or not loss.upcast else ", the 16-bit head output freed by logits.float()")
        )
    if cfg.model.gradient_checkpointing and libraries.ignores_checkpointing(model_type):
        model.gradient_checkpointing_disable()
        notes.append(
            f"traced without gradient checkpointing: transformers {libraries.transformers} does not checkpoint "
            f"{model_type} ({CHECKPOINTING_LOST_AND_RESTORED})"
        )
    keep_cache = libraries.keeps_training_cache(model_type, cfg.model.gradient_checkpointing)
    if keep_cache:
        notes.append(
            f"transformers {libraries.transformers} keeps {model_type}'s key/value cache under gradient checkpointing: "
            "every layer's c_attn output held to the end of the forward, as that release does"
        )
    with fake_mode:
        optimizer, optimizer_notes = _optimizer(cfg, model, on_cuda)
        trace = trace_steps(
            model,
            optimizer,
            cfg,
            lambda: torch.randint(0, vocab, (batch, seq_len)),
            block_bytes=cuda_block_bytes if on_cuda else exact_bytes,
            host_step_counters=on_cuda,
            softmax_backward_temporary=on_cuda,
            loss=loss,
            keep_cache=keep_cache,
        )
    return trace, notes + optimizer_notes


@contextmanager
def _eager_transformers() -> Iterator[None]:
    """Let transformers decide masks as it does for real tensors.

    It treats a fake tensor as a graph being traced (`is_tracing`) and then keeps every
    data-dependent path open: it builds the (batch, 1, seq, seq) causal mask the runner never
    allocates, and with a mask SDPA loses its GQA path (`repeat_kv` copies K and V). The runner's
    inputs answer those questions without reading them: no attention mask, positions 0..seq-1, so
    one unpadded sequence per row. The patches are process-wide while the trace runs, so traces
    take turns (`_TRACE_LOCK`).
    """
    import transformers.masking_utils as masking
    import transformers.utils.import_utils as import_utils

    with ExitStack() as stack:
        if hasattr(import_utils, "is_fake_tensor"):
            stack.enter_context(mock.patch.object(import_utils, "is_fake_tensor", lambda _tensor: False))
        if hasattr(masking, "find_packed_sequence_indices"):
            stack.enter_context(mock.patch.object(masking, "find_packed_sequence_indices", lambda _positions: None))
        yield


@contextmanager
def _cuda_kernels(libraries: Libraries) -> Iterator[None]:
    """Where CUDA's kernels keep different tensors for backward than the CPU's, run CUDA's choice."""
    with _cuda_dropout(), _cuda_sdpa(libraries.sdpa_gqa_takes_math_kernel):
        yield


@contextmanager
def _cuda_sdpa(gqa_takes_math: bool) -> Iterator[None]:
    """Scaled dot-product attention as CUDA runs it: with dropout, and fp32 grouped-query attention.

    fp32 with `enable_gqa` (transformers >= 4.54 with no mask, SRC_SDPA_GQA_MATH): only CUDA's flash
    kernel takes enable_gqa and it takes 16-bit inputs only, so CUDA runs the math kernel, which
    keeps the b·a·s² probabilities; the CPU's flash kernel takes both and would keep O(s). The trace
    runs the math kernel there.

    With dropout:

    On CUDA the flash and memory-efficient kernels take `dropout_p` themselves: their filters
    (`can_use_flash_attention`, `can_use_mem_efficient_attention` in
    aten/src/ATen/native/transformers/cuda/sdp_utils.cpp) have no dropout check, and the kernel
    draws the mask from a Philox seed and offset it regenerates in backward, keeping no mask. The
    CPU's flash kernel refuses dropout (`check_for_dropout` in sdp_utils_cpp.cpp), so the CPU falls
    back to the math kernel, which materialises and keeps b·a·s² scores, probabilities and mask.
    What a fused kernel keeps does not depend on dropout (q, k, v, output, logsumexp; the seed and
    offset are host scalars), so the trace runs SDPA with dropout 0 and gets the CPU's fused kernel
    with the same saved tensors. Process-wide while tracing.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if gqa_takes_math and kwargs.get("enable_gqa") and _dtype_under_autocast(query) == torch.float32:
            return torch.ops.aten._scaled_dot_product_attention_math(
                query, key, value, attn_mask, dropout_p, is_causal, scale=kwargs.get("scale"), enable_gqa=True
            )[0]
        return original(query, key, value, attn_mask, 0.0, is_causal, **kwargs)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", fused):
        yield


def _dtype_under_autocast(tensor: torch.Tensor) -> torch.dtype:
    """The dtype an autocast op computes `tensor` in (SDPA is on autocast's 16-bit list)."""
    kind = tensor.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else tensor.dtype


@contextmanager
def _cuda_dropout() -> Iterator[None]:
    """Dropout as ATen runs it on CUDA.

    ATen's `dropout` takes the fused `native_dropout` kernel on CUDA only, which keeps a bool mask
    for backward; on the CPU it multiplies by a noise tensor in the input's dtype and keeps that
    (aten/src/ATen/native/Dropout.cpp, `is_fused_kernel_acceptable`). For LoRA's dropout on a
    bf16 7B model at 2048 tokens that is 0.5 GiB of difference. Process-wide while tracing.
    """
    original = torch.nn.functional.dropout

    def fused(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        if inplace or not training or not 0 < p < 1 or input.numel() == 0:
            return original(input, p, training, inplace)
        return torch.ops.aten.native_dropout(input, p, True)[0]

    with mock.patch.object(torch.nn.functional, "dropout", fused):
        yield


def _totals(trace: StepTrace, persistent: dict[str, int]) -> dict[str, int]:
    """The analytic mode's keys (per rank under ZeRO), and what only a trace knows."""
    return {
        **persistent,
        "activations": trace.activation_bytes,
        "logits_loss": trace.maxima.get("logits_loss", 0),
        "saved_for_backward": trace.saved_activation_bytes,
        "trainable_parameters": trace.trainable_parameter_bytes,
        "buffers": trace.buffer_bytes,
    }


def _notes(cfg: RunConfig, on_cuda: bool) -> list[str]:
    notes = [
        f"peak over the second of {STEPS_TRACED} traced steps, so the optimizer states made by the first are "
        "alive during its forward as in steady-state training",
        _CPU_TRACE_NOTE,
    ]
    if on_cuda:
        notes += [
            _CUDA_DROPOUT_NOTE,
            _CUDA_SDPA_DROPOUT_NOTE,
            f"every tensor's block rounded up to {CUDA_BLOCK_BYTES} bytes as the CUDA caching allocator does",
            reserve_note(),
            "runtime overhead is the analytic mode's CUDA context (300 MiB); cuBLAS workspaces are counted in "
            "peak allocated (PyTorch's allocator holds them), cuDNN's and NCCL buffers are not",
            "CUDA's softmax backward makes grad × output before its kernel: one more b·a·s² tensor counted at "
            "eager attention's backward",
        ]
    else:
        notes.append("exact storage bytes: the CPU allocator does not round")
    if cfg.model.gradient_checkpointing:
        notes.append(
            "the input each checkpointed layer keeps for its recomputation counts as activations; "
            "totals.saved_for_backward, like the runner, sees only what saved-tensor hooks see"
        )
    if cfg.data.vary_length:
        notes.append(f"traced at the longest sequence, data.seq_len {cfg.data.seq_len}")
    if cfg.debug.leak_mb_per_step:
        notes.append("debug.leak_mb_per_step is left out: a leak grows every step, a trace is one step")
    if cfg.train.grad_accum_steps > MICRO_BATCHES_TRACED:
        notes.append(
            f"{MICRO_BATCHES_TRACED} of the {cfg.train.grad_accum_steps} accumulation micro-batches traced: "
            "the later ones repeat the second's memory"
        )
    return notes


def _untraced_state_terms(trace: StepTrace, cfg: RunConfig) -> list[Term]:
    if not trace.untraced_state_bytes:
        return []
    rule = "2 × 1 B per element + fp32 absmax per block (32-bit below 4096 elements)"
    if not cfg.train.optimizer.endswith("8bit"):
        rule = "2 × 4 B per element"
    return [Term(f"optimizer states ({cfg.train.optimizer}, sized)", trace.untraced_state_bytes, rule, SRC_BNB_8BIT)]


def _scaled(value: int, whole: int, sharded: int) -> int:
    """`value`, a part of `whole`, after `whole` became `sharded`."""
    return round(value * sharded / whole) if whole else 0


@dataclass
class _PerRank:
    """A trace as one data-parallel rank holds it."""

    peaks: dict[str, dict[str, int]]
    persistent: dict[str, int]  # parameters, gradients, optimizer_states, optimizer_transient
    terms: list[Term]
    notes: list[str]


def _per_rank(trace: StepTrace, cfg: RunConfig) -> _PerRank:
    """Each phase's peak under ZeRO (`diagnosis.sharding`, shared with the analytic mode).
    Sharding can move the peak (a full fine-tune's optimizer step shrinks the most), so every
    phase is sharded and the largest is taken after."""
    whole = {
        "parameters": trace.parameter_bytes,
        "gradients": trace.gradient_bytes,
        "optimizer_states": trace.optimizer_state_bytes,
        "optimizer_transient": trace.phase_peaks.get("optimizer", {}).get("transient", 0),
    }
    sharded, terms = shard_components(whole, cfg)
    if sharded == whole:
        return _PerRank(trace.phase_peaks, whole, terms, [])
    gathered, notes = _gathered(cfg)
    peaks = {}
    for phase, at_peak in trace.phase_peaks.items():
        moment = dict(at_peak)
        for key in ("gradients", "optimizer_states"):
            moment[key] = _scaled(at_peak[key], whole[key], sharded[key])
        weights = at_peak["parameters"] - trace.buffer_bytes
        moment["parameters"] = trace.buffer_bytes + _scaled(weights, whole["parameters"], sharded["parameters"])
        if phase == "optimizer":
            key = "optimizer_transient"
            moment["transient"] = _scaled(at_peak["transient"], whole[key], sharded[key])
        else:
            moment["parameters"] += gathered.backward if phase == "backward" else gathered.forward
        peaks[phase] = moment
    return _PerRank(peaks, sharded, terms, notes)


def _gathered(cfg: RunConfig) -> tuple[Gathered, list[str]]:
    """ZeRO-3 and FSDP gather parameters to full size while a module computes; the trace ran with
    whole parameters, so the analytic mode's count of them is added."""
    from diagnosis.architecture import ArchitectureError, shape_for

    if zero_stage(cfg) != 3 and not fsdp_strategy(cfg):
        return Gathered(), []
    try:
        gathered = gathered_parameter_bytes(shape_for(cfg.model.name), cfg)
    except ArchitectureError as error:
        return Gathered(), [f"gathered parameters not counted: {error}"]
    return gathered, [f"{gathered.name} ({gathered.formula}) are added to forward and backward"]


def _estimate(
    trace: StepTrace, cfg: RunConfig, on_cuda: bool, notes: list[str], workspaces: Term | None = None
) -> MemoryEstimate:
    rank = _per_rank(trace, cfg)
    peak_phase = max(rank.peaks, key=lambda phase: sum(rank.peaks[phase].values()))
    breakdown = {key: int(rank.peaks[peak_phase].get(key, 0)) for key in BREAKDOWN_KEYS}
    terms = _untraced_state_terms(trace, cfg) + rank.terms
    runtime = CUDA_CONTEXT_BYTES if on_cuda else 0
    reserve = allocator_reserve_bytes(sum(breakdown.values())) if on_cuda else 0
    if reserve:
        terms.append(reserve_term(sum(breakdown.values())))
    if workspaces:
        # Held at every moment of a steady-state step: added to the peak, moving none.
        breakdown["workspaces"] = workspaces.bytes
        terms.append(workspaces)
    if runtime:
        terms.append(Term("CUDA context", runtime, "300 MiB", SRC_CONTEXT))
    return MemoryEstimate(
        mode="traced",
        breakdown=breakdown,
        peak_phase=peak_phase,
        allocator_overhead_bytes=reserve,
        runtime_overhead_bytes=runtime,
        totals=_totals(trace, rank.persistent),
        per_layer_activation_bytes=trace.per_layer_activation_bytes,
        terms=tuple(terms),
        notes=tuple(notes + rank.notes + _notes(cfg, on_cuda)),
    )
