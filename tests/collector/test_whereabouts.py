import sys
from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from collector import whereabouts
from collector.whereabouts import Whereabouts, display_name


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config)


def test_display_names_drop_wrappers():
    assert display_name("base_model.model.model.layers.3.self_attn") == "model.layers.3.self_attn"
    assert display_name("base_model") == "" and display_name("base_model.model") == ""
    assert display_name("_orig_mod.model.norm") == "model.norm"


def test_on_a_profiled_step_the_hooks_leave_the_failing_module_on_top():
    model = tiny_llama()
    where = Whereabouts()
    where.track_modules(model)
    where.detail(True)  # the forward stack is kept on profiled steps; other steps read the traceback

    def fail(*args, **kwargs):
        raise MemoryError("simulated")

    model.model.layers[1].mlp.down_proj.forward = fail
    where.enter("forward", step=7, micro_batch=2)
    where.set_batch(1, 16)
    with pytest.raises(MemoryError, match="simulated"):
        model(input_ids=torch.randint(0, 128, (1, 16)))
    position = where.position()
    assert (position.step, position.micro_batch, position.phase) == (7, 2, "forward")
    blocks = ("model", "model.layers.1", "model.layers.1.mlp")
    assert position.module == "model.layers.1.mlp.down_proj"
    assert position.module_stack == (*blocks, "model.layers.1.mlp.down_proj")
    assert position.batch_shape == {"batch_size": 1, "seq_len": 16}


class _AllocatesInBackward(torch.autograd.Function):
    """Identity in forward; its backward asks the allocator for more than any machine has, so
    backward fails there with the allocator's own error (the CPU's, or CUDA's out-of-memory).
    With `save`, the node holds a saved tensor as most failing nodes do (a matmul's operands);
    without, it saves nothing."""

    @staticmethod
    def forward(ctx, x, save):
        if save:
            ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        torch.empty(1 << 60, dtype=torch.uint8, device=grad.device)  # "can't allocate memory" / "out of memory"
        raise AssertionError("the allocation above should have failed")


def _backward_failure(model, where, module, *, save=True):
    """Run a step whose backward fails inside `module`'s backward; return the error."""
    original = module.forward
    module.forward = lambda *args, **kwargs: _AllocatesInBackward.apply(original(*args, **kwargs), save)
    try:
        ids = torch.randint(0, 128, (2, 16), device=model.device)
        where.enter("forward", step=5, micro_batch=1)
        loss = model(input_ids=ids, labels=ids).loss
        where.enter("backward")
        try:
            loss.backward()
        except RuntimeError as error:
            assert "can't allocate memory" in str(error) or "out of memory" in str(error)
            return error
        raise AssertionError("backward did not fail")
    finally:
        del module.forward


def _failing_spots(model):
    """(module to fail in, the innermost tracked module a user should be told), every layer."""
    base = model.base_model.model if hasattr(model, "peft_config") else model
    spots = [(base.lm_head, "lm_head")]
    for index, layer in reversed(list(enumerate(base.model.layers))):
        spots += [
            (layer.mlp.down_proj, f"model.layers.{index}.mlp"),
            (layer.mlp.act_fn, f"model.layers.{index}.mlp"),
            (layer.mlp.up_proj, f"model.layers.{index}.mlp"),
            (layer.self_attn.o_proj, f"model.layers.{index}.self_attn"),
            (layer.self_attn.v_proj, f"model.layers.{index}.self_attn"),
            (layer.self_attn.q_proj, f"model.layers.{index}.self_attn"),
        ]
    return spots


_CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("lora", [False, True])
def test_a_backward_failure_on_an_ordinary_step_names_its_attention_or_mlp_from_the_graph(lora, device):
    """On CUDA backward runs on the device's own thread, from the same ready-queue order."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama().to(device)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    where = Whereabouts()
    where.track_modules(model)  # no detail(): what every step that is not profiled gets
    for module, expected in _failing_spots(model):
        for save in (True, False):
            position = where.position_at(_backward_failure(model, where, module, save=save))
            assert (position.phase, position.step, position.micro_batch) == ("backward", 5, 1)
            assert position.module == expected, (module, save, position.module)
            assert position.module_stack[-1] == expected and position.module_stack[0] == expected.split(".")[0]


def _calls_into(filename, called, frame, event, arg):
    if frame.f_code.co_filename == filename:
        called.append(frame.f_code.co_name)


def test_an_ordinary_step_runs_nothing_in_backward_and_keeps_only_this_micro_batchs_nodes():
    model = tiny_llama()
    where = Whereabouts()
    where.track_modules(model)
    ids = torch.randint(0, 128, (1, 16))
    for _ in range(2):
        where.enter("forward", step=1)
        loss = model(input_ids=ids, labels=ids).loss
        # one node per innermost module (embeddings, 2 x attention and MLP, head) and one for the loss
        assert len(where._graph_marks) == 1 + 2 * 2 + 1 + 1
        where.enter("backward")
        called = []  # every Python call into the tracker while backward runs (this thread: the CPU's)
        sys.setprofile(partial(_calls_into, whereabouts.__file__, called))
        try:
            loss.backward()
        finally:
            sys.setprofile(None)
        assert not called and where.module is None  # nothing follows backward as it runs
    where.remove()
    assert not where._graph_marks


def test_under_gradient_checkpointing_backward_is_followed_by_markers_as_it_runs():
    """Reading a saved tensor of a checkpointed layer would recompute it: those models keep the
    markers, which say where backward is while it runs."""
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    where = Whereabouts()
    where.track_modules(model)
    seen = {}

    def probe(name):
        def forward_hook(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda grad: seen.__setitem__(name, where.module))

        return forward_hook

    for index, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_hook(probe(f"model.layers.{index}.self_attn"))
        layer.mlp.up_proj.register_forward_hook(probe(f"model.layers.{index}.mlp"))
    where.enter("forward", step=1)
    ids = torch.randint(0, 128, (1, 16))
    out = model(input_ids=ids, labels=ids)
    assert not where._graph_marks
    where.enter("backward")
    out.loss.backward()
    assert len(seen) == 4 and all(module == name for name, module in seen.items()), seen


def test_removed_hooks_stop_tracking():
    model = tiny_llama()
    where = Whereabouts()
    where.track_modules(model)
    where.remove()
    where.enter("forward")
    model(input_ids=torch.randint(0, 128, (1, 8)))
    assert where.module_stack() == ()


def test_ordinary_steps_hook_only_the_innermost_modules_and_detail_adds_the_rest():
    model = tiny_llama()
    where = Whereabouts()
    where.track_modules(model)
    layer = model.model.layers[0]
    down_proj, mlp = layer.mlp.down_proj, layer.mlp
    # Ordinary: one marker on attention / MLP (where backward enters), nothing on blocks or projections.
    assert len(mlp._forward_hooks) == 1 and not mlp._forward_pre_hooks
    assert not layer._forward_hooks and not layer._forward_pre_hooks and not down_proj._forward_hooks
    where.detail(True)
    where.detail(True)  # idempotent: one pair of hooks, not two
    assert len(down_proj._forward_pre_hooks) == 1 and len(down_proj._forward_hooks) == 1
    assert len(mlp._forward_pre_hooks) == 1 and len(mlp._forward_hooks) == 1  # the marker gave way
    assert len(layer._forward_pre_hooks) == 1
    where.detail(False)
    assert not down_proj._forward_pre_hooks and not down_proj._forward_hooks and not layer._forward_hooks
    assert len(mlp._forward_hooks) == 1
    where.remove()
    assert not mlp._forward_pre_hooks and not mlp._forward_hooks


def test_norms_and_rotary_tables_are_not_followed_and_attaching_twice_does_not_double_hooks():
    model = tiny_llama()
    where = Whereabouts()
    where.track_modules(model)
    count = len(where._handles)
    assert not model.model.layers[0].input_layernorm._forward_pre_hooks
    assert not model.model.rotary_emb._forward_pre_hooks and not model.model.norm._forward_pre_hooks
    where.track_modules(model)
    assert len(where._handles) == count
    where.detail(True)
    assert len(model.model.layers[0].mlp.down_proj._forward_pre_hooks) == 1
    assert not model.model.layers[0].input_layernorm._forward_pre_hooks


def _fail(*args, **kwargs):
    raise MemoryError("simulated")


def _failure(model, where, ids):
    where.enter("forward", step=3, micro_batch=0)
    try:
        model(input_ids=ids)
    except MemoryError as error:
        return error
    raise AssertionError("the forward did not fail")


@pytest.mark.parametrize("detail", [False, True])
def test_the_traceback_names_the_failing_projection_on_any_step(detail):
    model = tiny_llama()
    where = Whereabouts()
    where.track_modules(model)
    where.detail(detail)
    model.model.layers[1].mlp.down_proj.forward = _fail
    error = _failure(model, where, torch.randint(0, 128, (1, 16)))
    position = where.position_at(error)
    assert position.module == "model.layers.1.mlp.down_proj"
    assert position.module_stack == ("model", "model.layers.1", "model.layers.1.mlp", "model.layers.1.mlp.down_proj")
    assert (position.step, position.phase) == (3, "forward")


def test_the_traceback_names_a_norm_and_an_adapted_layer_under_the_names_users_know():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    where = Whereabouts()
    where.track_modules(model)
    ids = torch.randint(0, 128, (1, 16))
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].forward = _fail
    position = where.position_at(_failure(model, where, ids))
    assert position.module == "model.layers.0.self_attn.q_proj"  # not …q_proj.lora_A.default
    del model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].forward
    model.base_model.model.model.layers[1].input_layernorm.forward = _fail  # norms have no hooks at all
    position = where.position_at(_failure(model, where, ids))
    assert position.module == "model.layers.1.input_layernorm"
    assert position.module_stack[-2:] == ("model.layers.1", "model.layers.1.input_layernorm")


def test_without_the_models_frames_the_hooks_position_stands():
    model = tiny_llama()
    where = Whereabouts()
    where.track_modules(model)
    where.enter("backward")
    try:
        raise MemoryError("in the autograd engine: no module frames")
    except MemoryError as error:
        assert where.position_at(error) == where.position()
    assert where.position_at(None) == where.position()


def _loss_through(function):
    """A loss_function that sends the logits through `function` first: a node past the LM head."""

    def loss_function(logits, labels, vocab_size, **kwargs):
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(function(logits), labels, vocab_size, **kwargs)

    return loss_function


def _allocates_in_forward(logits):
    torch.empty(1 << 60, dtype=torch.uint8)  # the CPU allocator's own "can't allocate memory"
    raise AssertionError("the allocation above should have failed")


@pytest.mark.parametrize("detail", [False, True])
def test_a_forward_failure_in_the_loss_is_placed_in_the_loss(detail):
    """After the LM head returns, only the loss runs (the fp32 upcast, the log-softmax): no module
    of the model's is on the traceback, and "(no module)" told a user nothing."""
    model = tiny_llama()
    where = Whereabouts()
    where.track_modules(model)
    where.detail(detail)
    model.loss_function = _loss_through(_allocates_in_forward)
    ids = torch.randint(0, 128, (1, 16))
    where.enter("forward", step=3, micro_batch=0)
    with pytest.raises(RuntimeError, match="can't allocate memory") as failure:
        model(input_ids=ids, labels=ids)
    position = where.position_at(failure.value)
    assert (position.phase, position.module, position.module_stack) == ("forward", "loss", ("loss",))
    # The same failure before the head's forward is not the loss: the embedding's frame names it.
    model.model.embed_tokens.forward = _fail
    position = where.position_at(_failure(model, where, ids))
    assert position.module == "model.embed_tokens"


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_backward_failure_in_the_loss_is_placed_in_the_loss(checkpointing, device):
    """Backward starts in the loss: read from the graph on ordinary steps, from the markers (none
    reached yet) under gradient checkpointing. On CUDA backward runs on the device's own thread."""
    model = tiny_llama().to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    where = Whereabouts()
    where.track_modules(model)
    model.loss_function = _loss_through(lambda logits: _AllocatesInBackward.apply(logits, True))
    ids = torch.randint(0, 128, (2, 16), device=device)
    where.enter("forward", step=5, micro_batch=1)
    loss = model(input_ids=ids, labels=ids).loss
    where.enter("backward")
    with pytest.raises(RuntimeError, match="can't allocate memory|out of memory") as failure:
        loss.backward()
    position = where.position_at(failure.value)
    assert (position.phase, position.module) == ("backward", "loss")
