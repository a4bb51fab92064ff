"""Where the training step is at any moment: phase, micro-batch, batch shape and module.

Phases, micro-batch and shape are plain assignments. The module comes from three places. In
forward, a failure's own traceback holds the frames of every module it was inside (`position_at`):
exact down to the projection or norm, and free until something fails. In backward the frames are
the autograd engine's, so the module is read from the autograd graph once backward has failed
(`locate_in_graph`): each innermost tracked module (attention, MLP, embeddings, head) notes its
output's autograd node as forward creates it, and after the failure the nodes whose saved tensors
backward has already freed show how far it got. Where gradient checkpointing recomputes layers
inside backward, reading a saved tensor could recompute it, so those models keep a marker hook on
each innermost module's output that says when backward enters it instead.

Cost on an ordinary step: one forward hook call per innermost tracked module, which keeps a
reference to a node (~1 µs); a marker costs ~35 µs more (an autograd hook that backward calls
into Python, measured on the tiny Llama on the CPU). Every hooked module leaves PyTorch's fast call
path, so blocks, projections and the forward stack (pre- and post-hooks on every module, with
where backward enters and leaves each) are followed only on the layer profiler's sampled steps
(`detail`).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

import torch

from collector.readings import LOSS_MODULE

PHASES = ("setup", "data", "forward", "backward", "optimizer", "eval", "checkpoint_save")
# Functions whose frames mean the loss is being computed (transformers' shared loss, torch's).
_LOSS_FUNCTIONS = frozenset({"ForCausalLMLoss", "fixed_cross_entropy", "cross_entropy", "nll_loss", "log_softmax"})

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


def _uses_gradient_checkpointing(model: torch.nn.Module) -> bool:
    """transformers marks every checkpointed module with `gradient_checkpointing = True`."""
    return any(getattr(module, "gradient_checkpointing", None) is True for module in model.modules())


def _module_prefixes(module: str) -> tuple[str, ...]:
    parts = module.split(".")
    return tuple(".".join(parts[: i + 1]) for i in range(len(parts)))


# AccumulateGrad nodes carry the largest sequence number (they run as soon as they are ready);
# they belong to no module's range.
_NO_SEQUENCE = 2**62
_SAVED_FIELDS: dict[type, tuple[str, ...]] = {}


def _saved_fields(node: object) -> tuple[str, ...]:
    """The attributes that unpack a node's saved tensors: `_saved_<x>` for each `_raw_saved_<x>`
    (the SavedVariables; `_saved_<x>_sym_sizes` and the like are plain values), `saved_tensors`
    for a Python autograd Function."""
    kind = type(node)
    if kind not in _SAVED_FIELDS:
        raw = [name[len("_raw_saved_") :] for name in dir(node) if name.startswith("_raw_saved_")]
        _SAVED_FIELDS[kind] = tuple("saved_tensors" if name == "tensors" else f"_saved_{name}" for name in raw)
    return _SAVED_FIELDS[kind]


def _has_run(node: object) -> bool | None:
    """True once backward has run the node (it frees the saved tensors then), False while it holds
    them, None if it saves none (nothing tells)."""
    state = None
    for field in _saved_fields(node):
        try:
            value = getattr(node, field)
        except RuntimeError:  # "Trying to backward through the graph a second time": freed
            return True
        if isinstance(value, torch.Tensor) or isinstance(value, tuple) and value:
            state = False
    return state


def _output_embeddings(model: torch.nn.Module) -> object:
    """The LM head (transformers' `get_output_embeddings`, through a peft wrapper), or None."""
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError, TypeError):
        return None


def _in_loss_function(tb: TracebackType | None) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _LOSS_FUNCTIONS:
            return True
        tb = tb.tb_next
    return False


def _graph_nodes(roots: Iterable[object]) -> list[object]:
    seen: dict[int, object] = {}  # holding each node keeps its Python wrapper, and so its id, unique
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        todo.extend(next_node for next_node, _ in node.next_functions)
    return list(seen.values())


def locate_in_graph(roots: Iterable[object], module_ends: list[tuple[int, str]]) -> str | None:
    """The module whose backward was running when backward failed, read from the graph it left.

    Forward numbers autograd nodes in creation order (`_sequence_nr`), and backward runs the ready
    node with the highest number first; a node's inputs in backward come from nodes created after
    it, so when the node numbered s fails, every node numbered above s has run and none below. A
    node that has run has freed its saved tensors, one that has not (or failed) still holds them:
    the highest number still holding them is the failing node, or the nearest one below it when
    the failing node saves nothing. `module_ends` holds, in creation order, the number of each
    innermost module's output node and its name; a node belongs to the first module ending at or
    after it, and past the last one to the loss (LOSS_MODULE)."""
    highest_pending = -1
    for node in _graph_nodes(roots):
        number = node._sequence_nr()
        if highest_pending < number < _NO_SEQUENCE and _has_run(node) is False:
            highest_pending = number
    if highest_pending < 0 or not module_ends:
        return None
    index = bisect.bisect_left([number for number, _ in module_ends], highest_pending)
    return module_ends[index][1] if index < len(module_ends) else LOSS_MODULE


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
        # The LM head's name, whether its forward has returned in this micro-batch, and whether
        # backward has reached any tracked module yet: a failure between the two is in the loss.
        self._head: str | None = None
        self._head_done = False
        self._backward_entered = False
        self._handles: list = []
        self._tracking = False
        self._shallow_modules: list[tuple[torch.nn.Module, str]] = []
        self._innermost: list[tuple[torch.nn.Module, str]] = []
        self._deep_modules: list[tuple[torch.nn.Module, str]] = []
        self._detailed = False  # the full set of hooks is attached (a profiled step)
        # Ordinary steps without gradient checkpointing: (sequence number, module name, node) of
        # each innermost module's output in this micro-batch's forward, read if backward fails.
        self._graph_marks: list[tuple[int, str | None, object]] = []
        self._reads_graph = False
        self._model: torch.nn.Module | None = None
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
            self._graph_marks.clear()  # the last micro-batch's graph is done with
            self._head_done = False
        elif phase == "backward":
            self._backward_module = None
            self._backward_entered = False

    def set_batch(self, batch_size: int, seq_len: int) -> None:
        self.batch_shape = {"batch_size": batch_size, "seq_len": seq_len}

    # --- modules -------------------------------------------------------------------------
    def track_modules(self, model: torch.nn.Module) -> None:
        """Ordinary steps get one forward post-hook on each innermost tracked module (attention,
        MLP, embeddings, head), which notes its output's autograd node (or, under gradient
        checkpointing, marks where backward enters it); a forward failure is placed by its
        traceback (`position_at`). `detail(True)` adds the full set for profiled steps."""
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
        self._head = self._names_by_id.get(id(_output_embeddings(model)))
        self._tracking = True
        self._reads_graph = not _uses_gradient_checkpointing(model)
        self._model = model
        self._attach_ordinary()

    def _attach_ordinary(self) -> None:
        if not self._reads_graph:
            for module, shown in self._innermost:
                self._handles.append(module.register_forward_hook(self._enter_marker(shown)))
            return
        for module, shown in self._innermost:
            self._handles.append(module.register_forward_hook(self._graph_mark(shown)))
        if self._model is not None:  # its own output (the loss) roots the graph past its last module
            self._handles.append(self._model.register_forward_hook(self._graph_mark(None)))

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
        self._graph_marks.clear()
        self._model = None

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

    def _graph_mark(self, name: str | None) -> Callable:
        """Note the node that made the module's output; nothing runs in backward. The notes last
        until the next forward: harmless after a backward (it freed what the nodes saved), but a
        forward with grad enabled and no backward after it (an evaluation outside `no_grad`) would
        keep its saved tensors alive that long."""

        is_head = name is not None and name == self._head

        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            if is_head:
                self._head_done = True
            tensor = _first_grad_tensor(output)
            node = tensor.grad_fn if tensor is not None else None
            if node is not None:
                self._graph_marks.append((node._sequence_nr(), name, node))

        return hook

    def _enter_marker(self, name: str) -> Callable:
        """An ordinary step's only hook on a module: when backward reaches its output, it is inside it."""
        backward_enter = self._backward_enter(name)
        is_head = name == self._head

        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            if is_head:
                self._head_done = True
            _on_gradient_of(output, backward_enter)

        return hook

    def _post_hook(self, name: str, backward: bool) -> Callable:
        backward_enter = self._backward_enter(name)
        is_head = name == self._head

        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            if is_head:
                self._head_done = True
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
            self._backward_entered = True
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
        return _module_prefixes(module)

    def position_at(self, error: BaseException | None) -> Position:
        """The position, with the module stack read from `error`'s traceback where it holds the
        model's frames: exact down to the projection or norm that failed, on any step (the hooks
        follow projections on profiled steps only). A forward failure always has those frames; a
        backward one has them only inside a checkpointed layer's recomputation, and is otherwise
        placed by the graph it left (`locate_in_graph`). A failure with no module's frames, after
        the LM head's forward or before backward reaches the head, is in the loss (LOSS_MODULE)."""
        position = self.position()
        if error is None or position.phase not in ("forward", "backward") or not self._names_by_id:
            return position
        stack = self._stack_in(error.__traceback__)
        if stack:
            return dataclasses.replace(position, module=stack[-1], module_stack=stack)
        module = None
        if position.phase == "forward" and (self._head_done or _in_loss_function(error.__traceback__)):
            module = LOSS_MODULE
        elif position.phase == "backward" and self._graph_marks:
            ends = sorted((number, name) for number, name, _ in self._graph_marks if name is not None)
            module = locate_in_graph([node for _, _, node in self._graph_marks], ends)
        elif position.phase == "backward" and self._follows_backward and not self._backward_entered:
            module = LOSS_MODULE  # the markers say where backward is: it failed before reaching the head
        if module is not None:
            return dataclasses.replace(position, module=module, module_stack=_module_prefixes(module))
        return position

    @property
    def _follows_backward(self) -> bool:
        """Hooks say where backward is as it runs (markers under checkpointing, profiled steps)."""
        return self._tracking and (self._detailed or not self._reads_graph)

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
