"""Where the training step is at any moment: phase, micro-batch, batch shape and module.

Kept current by plain assignments and module hooks that never undo themselves on an exception,
so when an allocation fails the state still describes the failing spot: the forward stack is
not popped (the post-hook never ran), the phase is the one that was entered last.

Cost: two Python calls per module forward (pre/post hook) and one tensor hook per module output
and input that requires grad; nothing reads a tensor's value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PHASES = ("setup", "data", "forward", "backward", "optimizer", "eval", "checkpoint_save")

# Prefixes peft and wrappers add in front of the names users know from the base model.
_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")


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


def _tensors(value: object) -> list[torch.Tensor]:
    """Tensors at the top level of a module's input or output (tuples, lists, ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = value.values()
    if isinstance(value, (tuple, list)) or hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        try:
            return [item for item in value if isinstance(item, torch.Tensor)]
        except TypeError:
            return []
    return []


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
        for name, module in model.named_modules():
            shown = display_name(name)
            if not shown:
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(shown)))
            self._handles.append(module.register_forward_hook(self._post_hook(shown)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _notify(self, event: str, name: str) -> None:
        for listener in self.listeners:
            listener(event, name)

    def _pre_hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            self._forward_stack.append(name)
            if self.listeners:
                self._notify("forward_enter", name)
            if torch.is_grad_enabled():
                for tensor in _tensors(args):
                    if tensor.requires_grad:
                        # Gradient w.r.t. the input is ready: this module's backward is done.
                        tensor.register_hook(self._backward_exit(name))

        return hook

    def _post_hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            if self._forward_stack and self._forward_stack[-1] == name:
                self._forward_stack.pop()
            if self.listeners:
                self._notify("forward_exit", name)
            if torch.is_grad_enabled():
                for tensor in _tensors(output):
                    if tensor.requires_grad:
                        # Gradient w.r.t. the output is ready: this module's backward begins.
                        tensor.register_hook(self._backward_enter(name))

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

    def position(self) -> Position:
        return Position(
            step=self.step,
            micro_batch=self.micro_batch,
            phase=self.phase,
            module=self.module,
            module_stack=self.module_stack(),
            batch_shape=dict(self.batch_shape) if self.batch_shape else None,
        )
