"""Where the training step is at any moment: phase, micro-batch, batch shape and module.

Phases, micro-batch and shape are plain assignments. The module comes from two places. In forward,
a failure's own traceback holds the frames of every module it was inside (`position_at`): exact
down to the projection or norm, and free until something fails. In backward the frames are the
autograd engine's, so a marker hook on each innermost tracked module's output (attention, MLP,
embeddings, head) says when backward enters it; modules are entered in reverse order, so entering
one is leaving the previous one. Hooks never undo themselves on an exception, so the state still
describes the failing spot.

Cost on an ordinary step: one forward hook call per innermost tracked module and one autograd hook
per output that requires grad; nothing reads a tensor's value. Each autograd hook is ~14 µs of
engine-to-Python call on the tiny Llama (CPU), and every hooked module leaves PyTorch's fast call
path, so blocks, projections and the forward stack (pre- and post-hooks on every module, with
where backward leaves each) are followed only on the layer profiler's sampled steps (`detail`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import torch

PHASES = ("setup", "data", "forward", "backward", "optimizer", "eval", "checkpoint_save")

# Prefixes peft and wrappers add in front of the names users know from the base model.
_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")
# peft's own submodules inside an adapted layer: their memory belongs to the layer they adapt
# (`q_proj`), and hooking them would double the hooks per layer for no better answer.
# Hooks reach down to this depth of name (`model.layers.17.self_attn`); deeper modules
# (`…self_attn.q_proj`, `…mlp.act_fn`) only on detailed steps. Measured on a tiny Llama, every
# leaf module tracked in backward added ~10% to a CPU step.
BACKWARD_DEPTH = 4
# Modules whose own memory is never the answer to "where did it fail" (a norm, rotary tables, a
# dropout) get no hooks even on detailed steps; a traceback still names them.
_UNTRACKED_KINDS = ("Norm", "RotaryEmbedding", "Dropout", "Identity")
_ADAPTER_PARTS = ("base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B")


def display_name(qualified_name: str) -> str:
    """`base_model.model.model.layers.3.self_attn` → `model.layers.3.self_attn`; a wrapper
    itself (`base_model`, `base_model.model`) → "" (not tracked: it is the model as a whole)."""
    if any(prefix.startswith(qualified_name + ".") for prefix in _WRAPPER_PREFIXES):
        return ""
    if qualified_name in ("base_model.model", "_orig_mod", "module"):
        return ""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if qualified_name.startswith(prefix):
                qualified_name = qualified_name[len(prefix) :]
                changed = True
    return qualified_name


def _first_grad_tensor(value: object) -> torch.Tensor | None:
    """The first tensor that requires grad at the top level of a module's input or output
    (hidden states, by transformers' convention). One per module keeps backward cheap."""
    if isinstance(value, torch.Tensor):
        return value if value.requires_grad else None
    if isinstance(value, dict):
        value = value.values()
    if isinstance(value, (tuple, list)) or hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        try:
            for item in value:
                if isinstance(item, torch.Tensor) and item.requires_grad:
                    return item
        except TypeError:
            return None
    return None


def _when_gradient_ready(tensor: torch.Tensor, hook: Callable[[object], None]) -> None:
    """Call `hook` when the gradient w.r.t. `tensor` is complete, before it flows further back.

    A pre-hook on the tensor's autograd node fires at that moment, as a tensor hook would, and
    costs a tenth of `Tensor.register_hook` to attach (no handle, no per-tensor dict); a leaf has
    no node and gets a tensor hook."""
    node = tensor.grad_fn
    if node is not None:
        node.register_prehook(hook)
    else:
        tensor.register_hook(hook)


def _on_gradient_of(value: object, hook: Callable[[object], None]) -> None:
    """Hook the gradient of the first tensor in a module's input or output that will get one."""
    if torch.is_grad_enabled():
        tensor = _first_grad_tensor(value)
        if tensor is not None:
            _when_gradient_ready(tensor, hook)


def _adapted_layer(name: str) -> str:
    """`…q_proj.lora_A.default` → `…q_proj`: an adapter's parts belong to the layer they adapt."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part in _ADAPTER_PARTS:
            return ".".join(parts[:index])
    return name


def _is_adapter_part(name: str) -> bool:
    return any(part in _ADAPTER_PARTS for part in name.split("."))


@dataclass(frozen=True)
class Position:
    """A copy of where the step was, taken at one moment."""

    step: int | None
    micro_batch: int | None
    phase: str
    module: str | None
    module_stack: tuple[str, ...]
    batch_shape: dict | None


class Whereabouts:
    """The live position; `position()` copies it. Attach to a model with `track_modules`."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.micro_batch: int | None = None
        self.phase = "setup"
        self.batch_shape: dict | None = None
        self._forward_stack: list[str] = []
        self._backward_module: str | None = None
        self._handles: list = []
        self._tracking = False
        self._shallow_modules: list[tuple[torch.nn.Module, str]] = []
        self._innermost: list[tuple[torch.nn.Module, str]] = []
        self._deep_modules: list[tuple[torch.nn.Module, str]] = []
        self._detailed = False  # the full set of hooks is attached (a profiled step)
        # Every module of the tracked model by id, under the name a user knows (adapter parts under
        # the layer they adapt): how a failure's traceback is read back into module names.
        self._names_by_id: dict[int, str] = {}
        # Called with (event, module name) on module boundaries; the layer profiler listens here.
        self.listeners: list[Callable[[str, str], None]] = []

    # --- the loop's side -----------------------------------------------------------------
    def enter(self, phase: str, *, step: int | None = None, micro_batch: int | None = None) -> None:
        self.phase = phase
        if step is not None:
            self.step = step
        if micro_batch is not None:
            self.micro_batch = micro_batch
        if phase == "forward":
            self._forward_stack.clear()
        elif phase == "backward":
            self._backward_module = None

    def set_batch(self, batch_size: int, seq_len: int) -> None:
        self.batch_shape = {"batch_size": batch_size, "seq_len": seq_len}

    # --- modules -------------------------------------------------------------------------
    def track_modules(self, model: torch.nn.Module) -> None:
        """Ordinary steps get one forward post-hook on each innermost tracked module (attention,
        MLP, embeddings, head), which marks where backward enters it; a forward failure is placed
        by its traceback (`position_at`). `detail(True)` adds the full set for profiled steps."""
        self.remove()  # attaching again (another model, or the same) must not double the hooks
        self._deep_modules.clear()
        self._shallow_modules = []
        self._names_by_id = {}
        for name, module in model.named_modules():
            shown = display_name(name)
            if shown:
                self._names_by_id[id(module)] = _adapted_layer(shown)
            if not shown or _is_adapter_part(shown) or any(k in type(module).__name__ for k in _UNTRACKED_KINDS):
                continue
            if shown.count(".") >= BACKWARD_DEPTH:
                self._deep_modules.append((module, shown))
            else:
                self._shallow_modules.append((module, shown))
        names = [shown for _, shown in self._shallow_modules]
        # A block's backward begins with its MLP's a moment later: only the innermost say where it is.
        self._innermost = [
            (module, shown)
            for module, shown in self._shallow_modules
            if not any(other.startswith(shown + ".") for other in names)
        ]
        self._tracking = True
        self._attach_ordinary()

    def _attach_ordinary(self) -> None:
        for module, shown in self._innermost:
            self._handles.append(module.register_forward_hook(self._enter_marker(shown)))

    def _hook(self, module: torch.nn.Module, shown: str, *, backward: bool) -> list:
        return [
            module.register_forward_pre_hook(self._pre_hook(shown, backward)),
            module.register_forward_hook(self._post_hook(shown, backward)),
        ]

    def detail(self, on: bool) -> None:
        """Profiled steps (on): every tracked module in forward, projections included, with where
        backward enters and leaves each; off: back to the ordinary steps' markers."""
        if on == self._detailed:
            return
        self._detailed = on
        self._remove_handles()
        if not self._tracking:
            return
        if on:
            for module, shown in self._shallow_modules:
                self._handles += self._hook(module, shown, backward=True)
            for module, shown in self._deep_modules:
                self._handles += self._hook(module, shown, backward=False)
        else:
            self._attach_ordinary()

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def remove(self) -> None:
        self._tracking = False
        self._detailed = False
        self._remove_handles()

    def _notify(self, event: str, name: str) -> None:
        for listener in self.listeners:
            listener(event, name)

    def _pre_hook(self, name: str, backward: bool) -> Callable:
        backward_exit = self._backward_exit(name)  # built once: a closure per call costs

        def hook(module: torch.nn.Module, args: tuple) -> None:
            self._forward_stack.append(name)
            if self.listeners:
                self._notify("forward_enter", name)
            if backward:
                _on_gradient_of(args, backward_exit)  # w.r.t. the input: this module's backward is done

        return hook

    def _enter_marker(self, name: str) -> Callable:
        """An ordinary step's only hook on a module: when backward reaches its output, it is inside it."""
        backward_enter = self._backward_enter(name)

        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            _on_gradient_of(output, backward_enter)

        return hook

    def _post_hook(self, name: str, backward: bool) -> Callable:
        backward_enter = self._backward_enter(name)

        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            if self._forward_stack and self._forward_stack[-1] == name:
                self._forward_stack.pop()
            if self.listeners:
                self._notify("forward_exit", name)
            if backward:
                _on_gradient_of(output, backward_enter)  # w.r.t. the output: this module's backward begins

        return hook

    # A tensor is often the output (or input) of a module and of its parent at once, so several
    # hooks fire together. Enter keeps the deepest module; exit only leaves a module we are in.
    def _backward_enter(self, name: str) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            current = self._backward_module
            if current is None or not current.startswith(name + "."):
                self._backward_module = name
            if self.listeners:
                self._notify("backward_enter", name)

        return hook

    def _backward_exit(self, name: str) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            current = self._backward_module
            if current is not None and (current == name or current.startswith(name + ".")):
                self._backward_module = name.rsplit(".", 1)[0] if "." in name else None
            if self.listeners:
                self._notify("backward_exit", name)

        return hook

    # --- reading -------------------------------------------------------------------------
    @property
    def module(self) -> str | None:
        if self.phase == "backward":
            return self._backward_module
        if self.phase == "forward" and self._forward_stack:
            return self._forward_stack[-1]
        return None

    def module_stack(self) -> tuple[str, ...]:
        if self.phase == "forward":
            return tuple(self._forward_stack)
        module = self.module
        if module is None:
            return ()
        parts = module.split(".")
        return tuple(".".join(parts[: i + 1]) for i in range(len(parts)))

    def position_at(self, error: BaseException | None) -> Position:
        """The position, with the module stack read from `error`'s traceback where it holds the
        model's frames: exact down to the projection or norm that failed, on any step (the hooks
        follow projections on profiled steps only). A forward failure always has those frames; a
        backward one has them only inside a checkpointed layer's recomputation."""
        position = self.position()
        if error is None or position.phase not in ("forward", "backward") or not self._names_by_id:
            return position
        stack = self._stack_in(error.__traceback__)
        if not stack:
            return position
        return dataclasses.replace(position, module=stack[-1], module_stack=stack)

    def _stack_in(self, tb: TracebackType | None) -> tuple[str, ...]:
        names: list[str] = []
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            name = self._names_by_id.get(id(owner)) if owner is not None else None
            if name and (not names or names[-1] != name):
                names.append(name)
            tb = tb.tb_next
        return tuple(names)

    def position(self) -> Position:
        return Position(
            step=self.step,
            micro_batch=self.micro_batch,
            phase=self.phase,
            module=self.module,
            module_stack=self.module_stack(),
            batch_shape=dict(self.batch_shape) if self.batch_shape else None,
        )
