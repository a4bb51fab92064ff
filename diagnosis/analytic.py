"""The analytic memory model: a training step's bytes from the config's numbers, in milliseconds.

It models the step the runner takes (`trainer/loop.py`): forward with labels, loss, backward,
`optimizer.step()`, `zero_grad(set_to_none=True)`, with PyTorch, transformers 5.x and peft doing
what they do. Activations are not a fitted constant per token: a decoder layer is walked op by op
(norm, projections, rotary, attention kernel, MLP, LoRA branches, dropout) with autograd's rule for
what each op keeps for backward, which tensors require grad (a frozen base keeps nothing for its
weight gradient), dtype casts (autocast copies, fp32 norms, peft's fp32 adapters, the fp32 hidden
states of a quantised base after peft's prepare_model_for_kbit_training) and shared storages (q/k/v
views of one fused projection are one storage). `ActivationCounter` in the runner counts the same
storages with saved-tensor hooks, so the two agree to the byte on the CPU
(tests/diagnosis/test_analytic.py).

The peak is the largest of a few moments of a steady-state step (optimizer states exist):
- forward: every saved activation plus the logits, their fp32 upcast and the log-softmax;
- backward: the loss's gradient over the vocabulary on top of all activations, then the layers'
  gradient temporaries as gradients of trainable parameters build up;
- optimizer: parameters + gradients + states + the update's temporaries.

On CUDA every tensor counted is rounded up to the caching allocator's 512-byte block, as
`max_memory_allocated` counts it (the traced mode rounds each storage it sees the same way). What
it does not model is said in `notes`: allocator fragmentation, NCCL and DeepSpeed buffers,
kernels' private workspaces.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from diagnosis.architecture import LinearShape, ModelShape, shape_for
from diagnosis.estimate import BREAKDOWN_KEYS, MemoryEstimate, Term
from diagnosis.gpus import compute_capability_of
from diagnosis.libraries import (
    CHECKPOINTING_LOST_AND_RESTORED,
    SRC_BNB_1270,
    SRC_GPT_BIGCODE_CACHE,
    SRC_SDPA_GQA_MATH,
    SRC_TRANSFORMERS_OLD_LOSS,
    SRC_TRANSFORMERS_REENTRANT,
    Libraries,
    LossLayout,
)
from diagnosis.reserve import allocator_reserve_bytes, reserve_note, reserve_term
from diagnosis.sharding import Gathered, fsdp_strategy, gathered_parameter_bytes, shard_components, zero_stage
from diagnosis.units import human_bytes
from diagnosis.workspaces import SRC_WORKSPACES, cublas_workspaces
from trainer.config import RunConfig

BYTES_PER_MIB = 1024**2
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "int64": 8, "bool": 1, "uint8": 1}

# --- sources the terms cite ------------------------------------------------------------------------
SRC_MEASURED = "saved_tensors_hooks on transformers 5.23 + torch 2.13 (tests/diagnosis/test_analytic.py)"
SRC_ZERO = "Rajbhandari et al., ZeRO (SC'20) §3.1: mixed-precision Adam keeps 2Ψ + 2Ψ + 12Ψ bytes"
SRC_KORTHIKANTI = "Korthikanti et al., Reducing Activation Recomputation in Large Transformer Models (2022) §4"
SRC_LORA = "Hu et al., LoRA (2021); peft LoraLayer: lora_A = Linear(d_in, r), lora_B = Linear(r, d_out)"
SRC_PEFT_DTYPE = "peft get_peft_model(autocast_adapter_dtype=True): 16-bit adapters are kept in fp32"
SRC_AUTOCAST = "torch.amp autocast: fp32 inputs of lower-precision ops are cast; casts of leaf weights cached"
SRC_CHUNKED_LOSS = (
    "trainer/chunked_loss.py: head and cross-entropy per chunk of train.loss_chunk_tokens, gradients made in forward "
    "(as Liger-Kernel's fused linear cross-entropy)"
)
SRC_LITGPT = (
    "litgpt model.py (one fused qkv linear; GPT.forward(lm_head_chunk_size=128) returns the logits as a list of "
    "128-token chunks) and utils.chunked_cross_entropy (bf16 cross-entropy per chunk), finetune/lora.py and full.py"
)
SRC_LITGPT_LOOP = (
    "litgpt finetune/lora.py and full.py fit() (read in 0.4.0, 0.4.5, 0.4.9, 0.4.13, 0.5.0, 0.5.3, 0.5.7): "
    "`logits = model(input_ids, ...)` and `loss` stay bound after backward (loss becomes a float at each "
    "log_interval, 1 by default), so the previous micro-batch's graph lives until the next forward returns; "
    "backward frees saved tensors, not what a custom Function's ctx holds"
)
SRC_LITGPT_LORA = "litgpt lora.py LoRAQKVLinear: one lora_dropout on the shared input, lora_A for every enabled q/k/v"
SRC_FABRIC_NF4 = (
    "lightning_fabric BitsandbytesPrecision: every nn.Linear (lm_head too) quantised from fp16; bitsandbytes "
    "MatMul4Bit dequantises to fp16 and casts to bf16 for each matmul"
)
SRC_HF_LOSS = "transformers loss_utils.ForCausalLMLoss: logits.float(), cross_entropy = log_softmax + nll_loss"
SRC_ADAMW = "torch.optim.AdamW: exp_avg, exp_avg_sq = zeros_like(param); step on CPU unless capturable/fused"
SRC_FOREACH = "torch.optim docs: foreach (CUDA default) trades peak memory for speed; _multi_tensor_adam sqrt list"
SRC_BNB_8BIT = "Dettmers et al., 8-bit Optimizers via Block-wise Quantization (ICLR'22); bitsandbytes Optimizer2State"
SRC_ADAFACTOR = "Shazeer & Stern, Adafactor (ICML'18); transformers.optimization.Adafactor (factored second moment)"
SRC_QLORA = "Dettmers et al., QLoRA (2023) §3: NF4 with blocksize 64, double quantization"
SRC_INT8 = "Dettmers et al., LLM.int8() (2022); bitsandbytes Int8Params: int8 weight + fp32 row scale"
SRC_PEFT_KBIT = (
    "peft 0.21 utils/other.py prepare_model_for_kbit_training: freezes all parameters, casts every fp16/bf16 "
    "parameter that is not Params4bit to fp32 (param.data.to(torch.float32))"
)
SRC_PEFT_KBIT_ACTS = (
    "after prepare_model_for_kbit_training the embedding output, norms, residual stream and the bitsandbytes "
    "linears' outputs (cast back to their input's dtype) are fp32"
)
SRC_EAGER_MASK = (
    "transformers eager_attention_forward: attn_weights + attention_mask, the mask built in the hidden states' "
    "dtype (masking_utils); torch type promotion makes 16-bit scores + fp32 mask fp32 before softmax"
)
SRC_BNB_MATMUL = (
    "bitsandbytes autograd: MatMul4Bit keeps only the packed weight (from 0.43.2; before, its input too); "
    "MatMul8bitLt keeps its input A"
)
SRC_FLASH = "Dao et al., FlashAttention (2022): keeps output + logsumexp, recomputes scores in backward"
SRC_CHECKPOINT = "torch.utils.checkpoint (non-reentrant): keeps each layer's input, recomputes it in backward"
SRC_DROPOUT = "ATen dropout: CUDA native_dropout keeps a bool mask, the CPU path a mask in the input dtype"
SRC_CUDA_SOFTMAX_BACKWARD = (
    "aten/src/ATen/native/cuda/SoftMax.cu softmax_backward_cuda_out (tmp = grad * output); seen in the "
    "allocator's C++ stacks on an H100, torch 2.11"
)
SRC_CONTEXT = "REFERENCE.md §2: CUDA context ~300 MB with lazy module loading (CUDA >= 11.7)"
SRC_CUDA_BLOCKS = (
    "c10/cuda/CUDACachingAllocator.cpp: round_size() rounds every request up to a multiple of kMinBlockSize "
    "(512 B), and allocated_bytes (max_memory_allocated) counts the rounded sizes"
)

CUDA_CONTEXT_BYTES = 300 * BYTES_PER_MIB
# The last bitsandbytes whose 4-bit matmul kept its input: what "an older one" is estimated as.
OLD_BITSANDBYTES = "0.43.1"
# The CUDA caching allocator hands out every tensor's storage in multiples of 512 bytes
# (kMinBlockSize); its statistics count the rounded sizes. The CPU allocator does not round.
CUDA_BLOCK_BYTES = 512
# bitsandbytes NF4: 4-bit codes, one absmax per 64 weights, stored as 8-bit under double
# quantization with one fp32 second-level constant per 256 blocks (QLoRA §3).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Without double quantization every 64-value block keeps an fp32 absmax.
NF4_NO_DQ_BYTES_PER_PARAM = 0.5 + 4 / 64


def nf4_bytes_per_param(double_quantization: bool) -> float:
    """Bytes one nf4 weight takes with its scales (model.double_quantization), for every reader."""
    return NF4_BYTES_PER_PARAM if double_quantization else NF4_NO_DQ_BYTES_PER_PARAM


# bitsandbytes 8-bit optimizers: two uint8 states, one fp32 absmax per 256-element block each;
# tensors under 4096 elements keep 32-bit states (min_8bit_size); 2 × 256 fp32 quantile maps each.
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
BNB_QMAP_BYTES = 2 * 256 * 4


# --- the run, as the estimator needs it ----------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    """The facts of a config the byte counts depend on, resolved once."""

    shape: ModelShape
    device: str  # "cpu" or "cuda"
    batch: int
    seq: int
    param_dtype: str
    autocast: str | None  # the autocast dtype, None without mixed precision
    attention: str  # "eager", "sdpa" (output + logsumexp), "sdpa_math" or "flash"
    checkpointing: bool
    full_ft: bool
    lora_targets: frozenset[str]
    lora_r: int
    lora_dropout: float
    lora_dtype: str
    quantization: str
    # peft.prepare_model_for_kbit_training ran on the quantised base: the dense weights (embeddings,
    # norms, lm_head, biases) are fp32, so param_dtype is fp32 for everything the walk sees.
    kbit_prepared: bool
    optimizer: str
    weight_decay: float
    accum: int
    # bitsandbytes < 0.43.2: every 4-bit matmul keeps its input on its autograd ctx (SRC_BNB_1270).
    bnb_keeps_input: bool = False
    # How the transformers that runs the step computes the loss (SRC_TRANSFORMERS_OLD_LOSS).
    loss: LossLayout = LossLayout()
    # train.loss_chunk_tokens: the runner's chunked head and loss (SRC_CHUNKED_LOSS); 0 = transformers'.
    loss_chunk: int = 0
    # model.implementation litgpt: Lightning's own GPT and its loss (SRC_LITGPT), not transformers'.
    litgpt: bool = False
    double_quantization: bool = True

    @property
    def nf4_bytes(self) -> float:
        return nf4_bytes_per_param(self.double_quantization)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def compute_dtype(self) -> str:
        return self.autocast or self.param_dtype

    def block(self, nbytes: int) -> int:
        """The device bytes of one tensor of `nbytes`: a multiple of 512 on CUDA (SRC_CUDA_BLOCKS)."""
        if self.device == "cuda":
            return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
        return nbytes

    def blocks(self, numels: Iterable[int], itemsize: float) -> int:
        """The device bytes of one tensor per element count, each rounded as `block` does."""
        if self.device != "cuda":
            return round(sum(numels) * itemsize)
        return sum(self.block(math.ceil(numel * itemsize)) for numel in numels)


def _attention_kernel(cfg: RunConfig, shape: ModelShape, device: str, compute_dtype: str, libraries: Libraries) -> str:
    impl = cfg.model.attn_implementation
    if impl == "flash_attention_2":
        return "flash"
    if impl == "sdpa" and shape.attn_logit_softcap:
        return "eager"  # transformers refuses sdpa for soft-capped attention (Gemma 2)
    if impl == "sdpa" and device.startswith("cuda"):
        return "sdpa_math" if sdpa_gqa_falls_back(shape, compute_dtype, libraries) else "sdpa"
    if impl == "sdpa":
        # SDPA with dropout has no fused CPU kernel: the math path materialises the scores.
        return "sdpa_math" if shape.attention_dropout > 0 else "sdpa"
    return "eager"


def sdpa_gqa_falls_back(shape: ModelShape, compute_dtype: str, libraries: Libraries) -> bool:
    """CUDA's SDPA on fp32 grouped-query attention runs the math kernel (SRC_SDPA_GQA_MATH)."""
    return shape.num_kv_heads < shape.num_heads and compute_dtype == "fp32" and libraries.sdpa_gqa_takes_math_kernel


def _resolve(cfg: RunConfig, shape: ModelShape, device: str, libraries: Libraries = Libraries()) -> _Run:
    lora = cfg.lora
    litgpt = cfg.model.implementation == "litgpt"
    # litgpt never calls peft: its adapters are made in the model's dtype and nothing is cast to fp32.
    kbit_prepared = cfg.model.quantization != "none" and cfg.model.prepare_for_kbit_training and not litgpt
    # The dtype of the weights outside the quantised linears, which the hidden states take from the
    # embedding on: prepare_model_for_kbit_training makes them fp32 (SRC_PEFT_KBIT).
    param_dtype = "fp32" if kbit_prepared else cfg.model.dtype
    # peft keeps adapters of a 16-bit (or quantised) base in fp32 (autocast_adapter_dtype=True).
    lora_dtype = "fp32" if param_dtype != "fp32" or cfg.model.quantization != "none" else param_dtype
    if litgpt:
        lora_dtype = param_dtype
    compute_dtype = param_dtype if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision
    return _Run(
        shape=shape,
        device="cuda" if device.startswith("cuda") else "cpu",
        batch=cfg.train.micro_batch_size,
        seq=cfg.data.seq_len,
        param_dtype=param_dtype,
        autocast=None if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision,
        attention=_attention_kernel(cfg, shape, device, compute_dtype, libraries),
        checkpointing=cfg.model.gradient_checkpointing and not libraries.ignores_checkpointing(shape.model_type),
        full_ft=lora is None,
        lora_targets=frozenset(lora.target_modules) if lora else frozenset(),
        lora_r=lora.r if lora else 0,
        lora_dropout=lora.dropout if lora else 0.0,
        lora_dtype=lora_dtype,
        quantization=cfg.model.quantization,
        kbit_prepared=kbit_prepared,
        optimizer=cfg.train.optimizer,
        weight_decay=cfg.train.weight_decay,
        accum=cfg.train.grad_accum_steps,
        bnb_keeps_input=cfg.model.quantization == "nf4" and libraries.bnb_keeps_matmul_input,
        loss=libraries.loss_layout(shape.model_type),
        loss_chunk=0 if litgpt else cfg.train.loss_chunk_tokens,
        litgpt=litgpt,
        double_quantization=cfg.model.double_quantization,
    )


def step_facts(
    cfg: RunConfig, *, device: str = "cuda", shape: ModelShape | None = None, transformers: str | None = None
) -> _Run:
    """The facts the byte counts rest on (dtypes, attention kernel, loss layout), for readers that
    name tensors rather than count them (diagnosis.failed_request): one resolution for both."""
    shape = shape or shape_for(cfg.model.name)
    return _resolve(cfg, shape, device, Libraries.that_run(transformers=transformers))


# --- the symbolic forward ---------------------------------------------------------------------
@dataclass(frozen=True)
class _T:
    """A tensor of the symbolic forward: its size, dtype, whether it requires grad, and which
    storage it lives in (views share one; key 0 is a parameter, never counted as saved)."""

    numel: int
    dtype: str
    grad: bool
    key: int
    storage: int  # device bytes of the whole storage (a multiple of 512 on CUDA)
    view: bool = False  # a part of a larger storage (q of a fused qkv, half of gate_up)


def _promote(a: str, b: str) -> str:
    return a if a == b else "fp32"


class _Trace:
    """Walks the forward op by op, recording the storages autograd keeps for backward.

    Each op follows its backward formula: a product keeps a factor when the other side needs a
    gradient; a linear keeps its input only for its weight's gradient and its weight only for the
    input's gradient. Saved bytes are attributed to the current tag (attention, mlp, lora...).
    """

    def __init__(self, run: _Run):
        self.run = run
        self.saved: dict[int, int] = {}
        self.by_tag: dict[str, int] = {}
        self.total = 0
        # Kept for backward but out of saved-tensor hooks' sight (closures, ctx attributes).
        self.hidden = 0
        # Storages an autograd ctx holds as a plain attribute: backward does not free them, the graph's
        # end does (SRC_LITGPT_LOOP), so they may outlive the step that made them.
        self.ctx_kept: dict[int, int] = {}
        self.tag = "other"
        self._keys = itertools.count(1)
        self.rope: tuple[_T, _T] | None = None

    def fork(self) -> _Trace:
        """A trace for one layer: fresh saved set, same storage numbering and rotary pair."""
        sub = _Trace(self.run)
        sub._keys, sub.rope, sub.tag = self._keys, self.rope, self.tag
        return sub

    @contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        previous, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = previous

    def new(self, numel: int, dtype: str, grad: bool) -> _T:
        return _T(numel, dtype, grad, next(self._keys), self.run.block(numel * ITEMSIZE[dtype]))

    @staticmethod
    def view(t: _T, numel: int) -> _T:
        return _T(numel, t.dtype, t.grad, t.key, t.storage, view=t.view or numel < t.numel)

    def keep_on_ctx(self, t: _T, tag: str | None = None) -> None:
        """A tensor a custom autograd Function stores on its ctx (bitsandbytes' ctx.tensors)."""
        self.save(t, tag=tag, hooks_see=False)
        if t.key:
            self.ctx_kept[t.key] = t.storage

    def save(self, *tensors: _T, tag: str | None = None, hooks_see: bool = True) -> None:
        for t in tensors:
            if t.key and t.key not in self.saved:
                self.saved[t.key] = t.storage
                self.total += t.storage
                self.hidden += 0 if hooks_see else t.storage
                name = tag or self.tag
                self.by_tag[name] = self.by_tag.get(name, 0) + t.storage

    def cast(self, t: _T, dtype: str) -> _T:
        return t if t.dtype == dtype else self.new(t.numel, dtype, t.grad)

    def autocast(self, t: _T) -> _T:
        """What a lower-precision op under autocast works on: a 16-bit copy of an fp32 input."""
        dtype = self.run.autocast
        return self.cast(t, dtype) if dtype and t.dtype == "fp32" else t

    def weight(self, numel: int, dtype: str, trainable: bool) -> _T:
        """A weight as a matmul sees it: the parameter, or autocast's 16-bit copy of it."""
        if self.run.autocast and dtype == "fp32":
            return self.new(numel, self.run.autocast, trainable)
        return _T(numel, dtype, trainable, 0, 0)

    # --- ops ---------------------------------------------------------------------------------
    def linear(self, x: _T, d_in: int, d_out: int, *, trainable: bool, dtype: str, quantized: bool = False) -> _T:
        rows = x.numel // d_in
        if quantized:
            return self._quantized_linear(x, rows, d_out)
        xin = self.autocast(x)
        w = self.weight(d_in * d_out, dtype, trainable)
        if trainable:
            self.save(xin)
        if x.grad:
            self.save(w, tag="autocast weight copies")
        out_dtype = xin.dtype if self.run.autocast else _promote(xin.dtype, dtype)
        return self.new(rows * d_out, out_dtype, x.grad or trainable)

    def _quantized_linear(self, x: _T, rows: int, d_out: int) -> _T:
        # bitsandbytes computes in bf16 (our loader's compute dtype) and casts back to the input's
        # dtype. MatMul8bitLt keeps its input in ctx.tensors, which saved-tensor hooks never see but
        # memory does. MatMul4Bit did too before 0.43.2 (and keeps only the packed weight since): its
        # input is Linear4bit's cast to the compute dtype, a copy of its own per linear when the
        # hidden states are fp32, the hidden states themselves when they are bf16.
        if self.run.quantization == "int8" and x.grad:
            self.keep_on_ctx(x)
        if self.run.bnb_keeps_input and x.grad:
            self.keep_on_ctx(self.cast(x, "bf16"), tag="bitsandbytes matmul inputs")
        out = self.new(rows * d_out, "bf16", x.grad)
        return self.cast(out, x.dtype)

    def mul(self, a: _T, b: _T) -> _T:
        if b.grad:
            self.save(a)
        if a.grad:
            self.save(b)
        return self.new(max(a.numel, b.numel), _promote(a.dtype, b.dtype), a.grad or b.grad)

    def add(self, a: _T, b: _T) -> _T:
        return self.new(max(a.numel, b.numel), _promote(a.dtype, b.dtype), a.grad or b.grad)

    def dropout(self, x: _T, p: float) -> _T:
        if p <= 0:
            return x  # F.dropout with p=0 returns its input
        if x.grad:
            mask_dtype = "bool" if self.run.device == "cuda" else x.dtype
            self.save(self.new(x.numel, mask_dtype, False))
        return self.new(x.numel, x.dtype, x.grad)

    def activation(self, x: _T) -> _T:
        if x.grad:
            self.save(x)
            if self.run.shape.activation == "gelu_new" and not self.run.litgpt:
                # (litgpt runs the same tanh-GELU as one fused op: F.gelu(approximate="tanh").)
                # NewGELUActivation is Python: 0.5·x·(1 + tanh(c·(x + 0.044715·x³))) keeps x, tanh, 0.5·x, 1 + tanh.
                self.save(*(self.new(x.numel, x.dtype, True) for _ in range(3)))
        return self.new(x.numel, x.dtype, x.grad)

    def norm(self, x: _T, trainable: bool) -> _T:
        kind, h = self.run.shape.norm, self.run.shape.hidden_size
        if not (x.grad or trainable):
            return self.new(x.numel, x.dtype, False)  # nothing to differentiate: nothing kept
        rows = x.numel // h
        if kind == "layernorm":
            # native_layer_norm keeps input, mean and rstd (per row; fp32 on CUDA, the input's dtype on CPU).
            stats = "fp32" if self.run.device == "cuda" else x.dtype
            self.save(x, self.new(rows, stats, False), self.new(rows, stats, False))
            return self.new(x.numel, x.dtype, True)
        xf = self.cast(x, "fp32")  # both RMSNorms compute in fp32
        if x.grad:
            self.save(xf, self.new(rows, "fp32", True))  # x and rsqrt(mean(x²) + eps)
        normed = self.new(x.numel, "fp32", x.grad)
        if kind == "rmsnorm_gemma" or self.run.litgpt:
            # Gemma: 1 + weight.float(); litgpt's RMSNorm multiplies by weight.float() in fp32 too (0.4+).
            scale = self.new(h, "fp32", trainable)
            out = self.mul(normed, scale)
            return self.cast(out, x.dtype)
        # Llama: weight * normed.to(input_dtype)
        normed = self.cast(normed, x.dtype)
        if trainable:
            self.save(normed)
        return self.new(x.numel, _promote(self.run.param_dtype, x.dtype), True)

    def rotary(self, x: _T) -> _T:
        """q·cos + rotate_half(q)·sin keeps cos and sin (one pair for all layers)."""
        assert self.rope is not None
        cos, sin = self.rope
        if x.grad:
            self.save(cos, sin, tag="rotary cos/sin")
        return self.new(x.numel, _promote(x.dtype, cos.dtype), x.grad)


# --- the model, module by module ------------------------------------------------------------------
def _project(tr: _Trace, x: _T, linear: LinearShape) -> _T:
    """A projection as the run builds it: trainable, frozen (maybe quantised) or frozen + LoRA."""
    run = tr.run
    if run.full_ft:
        return tr.linear(x, linear.d_in, linear.d_out, trainable=True, dtype=run.param_dtype)
    quantized = run.quantization != "none"
    base = tr.linear(x, linear.d_in, linear.d_out, trainable=False, dtype=run.param_dtype, quantized=quantized)
    if linear.name not in run.lora_targets:
        return base
    with tr.tagged("lora"):
        # peft: x.to(lora_A.weight.dtype), then lora_B(lora_A(dropout(x))) * scaling, added to base.
        xl = tr.cast(x, run.lora_dtype)
        dropped = tr.dropout(xl, run.lora_dropout)
        a = tr.linear(dropped, linear.d_in, run.lora_r, trainable=True, dtype=run.lora_dtype)
        b = tr.linear(a, run.lora_r, linear.d_out, trainable=True, dtype=run.lora_dtype)
    out = tr.add(base, b)
    return tr.cast(out, base.dtype)


def _linears(shape: ModelShape) -> dict[str, LinearShape]:
    """A layer's projections by role (gpt2 names two of them c_proj)."""
    layers = shape.linear_layers()
    attention = [linear for linear in layers if linear.block == "attention"]
    mlp = [linear for linear in layers if linear.block == "mlp"]
    roles = {"o": attention[-1], "down": mlp[-1]}
    if shape.fused_qkv:
        roles["qkv"] = attention[0]
    else:
        roles.update(q=attention[0], k=attention[1], v=attention[2])
    if shape.fused_gate_up:
        roles["gate_up"] = mlp[0]
    elif shape.gated_mlp:
        roles.update(gate=mlp[0], up=mlp[1])
    else:
        roles["up"] = mlp[0]
    return roles


def _qkv(tr: _Trace, x: _T, roles: dict[str, LinearShape]) -> tuple[_T, _T, _T]:
    s = tr.run.shape
    q_numel = x.numel // s.hidden_size * s.num_heads * s.head_dim
    kv_numel = q_numel // s.num_heads * s.num_kv_heads
    if tr.run.litgpt:
        return _litgpt_qkv(tr, x, roles, q_numel)
    if s.fused_qkv:
        qkv = _project(tr, x, roles["qkv"])  # q, k and v are views of one storage
        return tr.view(qkv, q_numel), tr.view(qkv, kv_numel), tr.view(qkv, kv_numel)
    return _project(tr, x, roles["q"]), _project(tr, x, roles["k"]), _project(tr, x, roles["v"])


def _litgpt_qkv(tr: _Trace, x: _T, roles: dict[str, LinearShape], q_numel: int) -> tuple[_T, _T, _T]:
    """litgpt's attention input (SRC_LITGPT, SRC_LITGPT_LORA): one linear makes q, k and v; its LoRA
    drops the shared input out once for every enabled part. Under grouped-query attention k and v
    are expanded to every head and reshaped, which copies them; with one head per group all three
    stay views of the one output, so attention's saved v keeps the whole of it; with one group
    (multi-query) the expand is a stride-0 view that reshape keeps a view too."""
    run, s = tr.run, tr.run.shape
    parts = [roles[name] for name in ("q", "k", "v")] if not s.fused_qkv else [roles["qkv"]]
    d_in, d_out = parts[0].d_in, sum(linear.d_out for linear in parts)
    quantized = run.quantization != "none" and not run.full_ft
    qkv = tr.linear(x, d_in, d_out, trainable=run.full_ft, dtype=run.param_dtype, quantized=quantized)
    enabled = [linear for linear in parts if linear.name in run.lora_targets]
    if enabled and not run.full_ft:
        with tr.tagged("lora"):
            dropped = tr.dropout(tr.cast(x, run.lora_dtype), run.lora_dropout)
            a = tr.linear(dropped, d_in, run.lora_r * len(enabled), trainable=True, dtype=run.lora_dtype)
            b = tr.linear(
                a,
                run.lora_r * len(enabled),
                sum(linear.d_out for linear in enabled),
                trainable=True,
                dtype=run.lora_dtype,
            )
            if len(enabled) < len(parts):
                # zero_pad: index_copy into the full width, which keeps its source for backward.
                tr.save(b)
                b = tr.new(qkv.numel, b.dtype, b.grad)
        qkv = tr.add(qkv, b)
    if s.num_kv_heads in (1, s.num_heads):
        # One head per group, or one group (an expand with stride 0 that reshape can still view):
        # k and v span every head either way, and rotary copies k at that size.
        return tr.view(qkv, q_numel), tr.view(qkv, q_numel), tr.view(qkv, q_numel)
    return tr.view(qkv, q_numel), tr.new(q_numel, qkv.dtype, qkv.grad), tr.new(q_numel, qkv.dtype, qkv.grad)


def _fused_attention(tr: _Trace, q: _T, k: _T, v: _T) -> _T:
    """SDPA's flash/efficient kernels and flash-attn keep q, k, v, output and the logsumexp;
    K/V are not repeated for GQA (enable_gqa / native GQA)."""
    run, s = tr.run, tr.run.shape
    grad = q.grad or k.grad or v.grad
    target = run.autocast or ("bf16" if run.attention == "flash" and q.dtype == "fp32" else None)
    if target:
        q, k, v = (tr.cast(t, target) if t.dtype == "fp32" else t for t in (q, k, v))
    out = tr.new(q.numel, q.dtype, grad)
    if grad:
        lse = tr.new(run.batch * s.num_heads * run.seq, "fp32", False)
        tr.save(q, k, v, out, lse)
    return out


def _scores_attention(tr: _Trace, q: _T, k: _T, v: _T) -> _T:
    """Eager attention (and SDPA's math fallback): the b·a·s² scores and probabilities are kept."""
    run, s = tr.run, tr.run.shape
    rep = s.num_heads // s.num_kv_heads
    if rep > 1 and not run.litgpt:  # repeat_kv materialises K and V for every head (litgpt's qkv already did)
        k = tr.new(k.numel * rep, k.dtype, k.grad)
        v = tr.new(v.numel * rep, v.dtype, v.grad)
    if run.batch > 1:
        # The batched matmul reshapes (b, a, s, d) to (b·a, s, d): a strided view of a fused qkv
        # storage is copied, and the copy is what autograd keeps.
        q, k, v = (tr.new(t.numel, t.dtype, t.grad) if t.view else t for t in (q, k, v))
    qa, ka = tr.autocast(q), tr.autocast(k)
    if run.attention == "sdpa_math":
        # The CPU math kernel computes in fp32 whatever the inputs, on q and k pre-scaled copies.
        qa, ka, v = tr.new(q.numel, "fp32", q.grad), tr.new(k.numel, "fp32", k.grad), tr.cast(v, "fp32")
    square = run.batch * s.num_heads * run.seq * run.seq
    scores = tr.mul(qa, ka)  # matmul keeps each side for the other's gradient
    with tr.tagged("attention scores"):
        scores = tr.new(square, qa.dtype, scores.grad)
        if s.attn_logit_softcap and run.attention == "eager":  # Gemma 2: tanh(scores / cap) · cap
            soft = tr.new(square, scores.dtype, scores.grad)
            if soft.grad:
                tr.save(soft)
        probs = tr.new(square, _softmax_dtype(run) if run.attention == "eager" else scores.dtype, scores.grad)
        if probs.grad:
            tr.save(probs)  # softmax keeps its output
        probs = tr.dropout(tr.cast(probs, qa.dtype), s.attention_dropout)  # .to(query.dtype)
        if run.attention == "eager":
            probs, v = tr.autocast(probs), tr.autocast(v)
        if v.grad:
            tr.save(probs)  # kept by probs @ v for v's gradient
    out = tr.mul(probs, v)
    return tr.new(q.numel, q.dtype if run.attention == "sdpa_math" else out.dtype, out.grad)


def _softmax_dtype(run: _Run) -> str:
    """The dtype eager attention's softmax computes in and keeps its output in.

    transformers' eager attention runs softmax(dtype=float32) in every family but GPT-2. GPT-2's
    softmax keeps its input's dtype, but that input is the scores plus the causal mask, which is
    built in the hidden states' dtype (the parameters'): under autocast of an fp32 model the
    16-bit scores are promoted to fp32 by the addition, and softmax keeps an fp32 output
    (SRC_EAGER_MASK). Other kernels: the compute dtype.
    """
    if run.attention != "eager":
        return run.compute_dtype
    if run.shape.model_type != "gpt2":
        return "fp32"
    return _promote(run.compute_dtype, run.param_dtype)


def _attention(tr: _Trace, x: _T, roles: dict[str, LinearShape]) -> _T:
    run, s = tr.run, tr.run.shape
    with tr.tagged("attention"):
        q, k, v = _qkv(tr, x, roles)
        if s.rotary_dim:
            q, k = tr.rotary(q), tr.rotary(k)
        if run.attention in ("sdpa", "flash"):
            out = _fused_attention(tr, q, k, v)
            if run.device == "cpu" and (s.rotary_by_concat or run.litgpt) and run.attention == "sdpa":
                # The CPU kernel lays its output out like q: head-major q (litgpt's always is) needs a
                # copy for o_proj. CUDA kernels always write (b, s, a, d), which needs none.
                out = tr.new(out.numel, out.dtype, out.grad)
        else:
            out = _scores_attention(tr, q, k, v)
            out = tr.new(out.numel, out.dtype, out.grad)  # transpose(1, 2).contiguous()
        return _project(tr, out, roles["o"])


def _mlp(tr: _Trace, x: _T, roles: dict[str, LinearShape]) -> _T:
    s = tr.run.shape
    with tr.tagged("mlp"):
        if s.fused_gate_up:
            both = _project(tr, x, roles["gate_up"])
            half = both.numel // 2
            hidden = tr.mul(tr.view(both, half), tr.activation(tr.view(both, half)))
        elif s.gated_mlp:
            gate = tr.activation(_project(tr, x, roles["gate"]))
            hidden = tr.mul(gate, _project(tr, x, roles["up"]))
        else:
            hidden = tr.activation(_project(tr, x, roles["up"]))
        return _project(tr, hidden, roles["down"])


def _layer(tr: _Trace, x: _T) -> _T:
    """One decoder layer, pre-norm residual (Phi-2: attention and MLP in parallel)."""
    s, trainable = tr.run.shape, tr.run.full_ft
    roles = _linears(s)
    drop = s.residual_dropout
    with tr.tagged("norms"):
        h = tr.norm(x, trainable)
    if s.parallel_block:
        attn = tr.dropout(_attention(tr, h, roles), drop)
        mlp = tr.dropout(_mlp(tr, h, roles), drop)
        return tr.add(tr.add(attn, mlp), x)
    attn = _attention(tr, h, roles)
    with tr.tagged("norms"):
        if s.norms_per_layer == 4:  # Gemma 2 post-attention norm
            attn = tr.norm(attn, trainable)
        x = tr.add(x, tr.dropout(attn, drop))
        h = tr.norm(x, trainable)
    mlp = _mlp(tr, h, roles)
    with tr.tagged("norms"):
        if s.norms_per_layer == 4:  # Gemma 2 post-feedforward norm
            mlp = tr.norm(mlp, trainable)
        return tr.add(x, tr.dropout(mlp, drop))


def _embed(tr: _Trace) -> _T:
    run, s = tr.run, tr.run.shape
    trainable = run.full_ft
    with tr.tagged("embeddings"):
        if trainable:
            tr.save(tr.new(run.tokens, "int64", False))  # embedding keeps the token ids
            if s.learned_positions:
                tr.save(tr.new(run.seq, "int64", False))  # and the position ids (1, s)
        x = tr.new(run.tokens * s.hidden_size, run.param_dtype, trainable)
        x = tr.dropout(x, s.embedding_dropout)
    if s.rotary_dim:
        # One (1, s, rotary_dim) cos/sin pair in the hidden states' dtype, shared by all layers.
        tr.rope = (tr.new(run.seq * s.rotary_dim, x.dtype, False), tr.new(run.seq * s.rotary_dim, x.dtype, False))
    return x


@dataclass(frozen=True)
class _Activations:
    """What the forward keeps, in bytes, and the tensors alive only around the loss."""

    embedding: int
    first_layer: int  # layer 0 differs under LoRA: its input does not require grad
    per_layer: int  # every later layer
    head: int  # final norm, lm_head input (and Gemma 2's soft-capped logits)
    mask: int  # eager attention's (b, 1, s, s) causal mask, kept into backward by checkpointing
    loss_saved: int  # log-softmax output and the shifted labels
    hidden: int  # of the saved bytes, those saved-tensor hooks do not see
    # Of the saved bytes, those on autograd ctx attributes (bitsandbytes' inputs): freed with the
    # graph, not by backward, wherever a training loop keeps the graph alive (SRC_LITGPT_LOOP).
    ctx_kept: int
    logits: int  # lm_head output, alive until forward returns
    # What the loss reads beside the logits: logits.float() when they are 16-bit, and before
    # transformers 4.49 a shifted contiguous copy in the loss's dtype (SRC_TRANSFORMERS_OLD_LOSS).
    loss_upcast: int
    loss_shifted: int
    loss_head: int  # the head output still alive during the loss (freed by `logits = logits.float()`)
    loss_cells: int  # one b·s·V tensor in the loss's dtype: the log-softmax output and each of its gradients
    # The chunked loss (SRC_CHUNKED_LOSS): the most one chunk's logits, log-softmax and their
    # gradients hold at once, in the forward that makes the gradients.
    chunk_peak: int
    # What the loss's backward holds beside what it kept: nll_loss's and log_softmax's gradients for
    # transformers' loss; litgpt's keeps its logits too.
    loss_backward: int
    layer_full: int  # one layer's own saved bytes (what checkpointing recomputes)
    by_tag: dict[str, int]  # one typical layer's bytes on the main trace, by part
    layer_tags: dict[str, int]  # one typical layer's own saved bytes by part, checkpointed or not

    @property
    def at_loss(self) -> int:
        """Alive while cross-entropy runs, beside what it keeps."""
        return self.loss_head + self.loss_upcast + self.loss_shifted + self.chunk_peak

    def total(self, num_layers: int) -> int:
        """Saved activations, without the loss's: the `activations` component."""
        return self.embedding + self.mask + self.first_layer + self.per_layer * (num_layers - 1) + self.head

    def hooks_see(self, num_layers: int) -> int:
        """What the runner's ActivationCounter measures: saved storages, the loss's included."""
        return self.total(num_layers) + self.loss_saved - self.hidden


def _merge(tr: _Trace, sub: _Trace) -> None:
    for key, size in sub.saved.items():
        if key not in tr.saved:
            tr.saved[key] = size
            tr.total += size
    tr.hidden += sub.hidden
    tr.ctx_kept.update(sub.ctx_kept)


def _walk_layer(tr: _Trace, x: _T) -> tuple[_T, int, _Trace, dict[str, int]]:
    """One layer on the main trace: (output, bytes it adds, its own trace, bytes it adds by tag)."""
    sub = tr.fork()
    y = _layer(sub, x)
    before = tr.total
    if tr.run.checkpointing:
        tr.save(x, tag="checkpointed layer inputs")  # the checkpoint keeps the layer's input only
        tags = {"checkpointed layer input": tr.total - before}
    else:
        _merge(tr, sub)
        tags = dict(sub.by_tag)
        if tr.total - before != sub.total:  # storages shared with earlier layers (cos/sin) count once
            tags.pop("rotary cos/sin", None)
    return y, tr.total - before, sub, tags


def _own_bytes(layer: _Trace, x: _T) -> int:
    """A layer's saved bytes without its input, which the previous layer or a checkpoint holds."""
    return layer.total - layer.saved.get(x.key, 0)


def _walk(run: _Run) -> _Activations:
    """The symbolic forward of the whole model: layer 0, one typical layer, the head and loss."""
    s = run.shape
    tr = _Trace(run)
    x = _embed(tr)
    embedding = tr.total
    mask = 0
    if run.attention == "eager" and run.checkpointing:
        # GPT-2 hands the mask to its checkpointed blocks positionally (a saved input); the others
        # as a keyword, held by the checkpoint's closure: alive all the same.
        tr.save(
            tr.new(run.batch * run.seq * run.seq, x.dtype, False), tag="causal mask", hooks_see=s.model_type == "gpt2"
        )
        mask = tr.total - embedding
    layer_input = x
    x, first, layer, tags = _walk_layer(tr, x)
    per_layer = later_hidden = later_ctx = 0
    if s.num_layers > 1:
        before, before_ctx, layer_input = tr.hidden, sum(tr.ctx_kept.values()), x
        x, per_layer, layer, tags = _walk_layer(tr, x)
        later_hidden = (tr.hidden - before) * (s.num_layers - 2)  # layers 2… hide as much as layer 1
        later_ctx = (sum(tr.ctx_kept.values()) - before_ctx) * (s.num_layers - 2)
    before = tr.total
    with tr.tagged("head"):
        h = tr.norm(x, run.full_ft)
        # The chunked loss runs the head's matmuls inside itself: nothing of them is kept.
        logits = None if run.loss_chunk else _head_logits(tr, h)
    head = tr.total - before
    if logits is None:
        loss = _chunked_loss_bytes(run)
    elif run.litgpt:
        loss = _litgpt_loss_bytes(run, logits)
    else:
        loss = _transformers_loss_bytes(run, logits)
    return _Activations(
        embedding=embedding,
        first_layer=first,
        per_layer=per_layer,
        head=head,
        mask=mask,
        hidden=tr.hidden + later_hidden + loss.pop("unseen"),
        ctx_kept=sum(tr.ctx_kept.values()) + later_ctx,
        layer_full=_own_bytes(layer, layer_input),
        by_tag=tags,
        layer_tags=dict(layer.by_tag),
        **loss,
    )


def _head_logits(tr: _Trace, h: _T) -> _T:
    run, s = tr.run, tr.run.shape
    quantized = run.litgpt and run.quantization != "none" and not run.full_ft  # Fabric quantises lm_head too
    logits = tr.linear(
        h, s.hidden_size, s.vocab_size, trainable=run.full_ft, dtype=run.param_dtype, quantized=quantized
    )
    if s.final_logit_softcap:  # Gemma 2: tanh(logits / cap) · cap keeps the tanh
        tr.save(tr.new(logits.numel, logits.dtype, True))
    return logits


def _transformers_loss_bytes(run: _Run, logits: _T) -> dict[str, int]:
    """The `_Activations` loss fields of transformers' own loss (ForCausalLMLoss, or the older
    shifted copy): the whole micro-batch's logits, their fp32 copy and the log-softmax."""
    s, layout = run.shape, run.loss
    loss_dtype = "fp32" if layout.upcast else logits.dtype
    upcast = run.block(run.tokens * s.vocab_size * 4) if loss_dtype != logits.dtype else 0
    if layout.shifted_copy:  # shift_logits = logits[..., :-1, :].contiguous(); labels[..., 1:].contiguous()
        rows = run.batch * (run.seq - 1)
        labels = 0 if run.batch == 1 else rows * 8
    else:
        rows = run.tokens
        labels = (run.seq + 1) * 8 if run.batch == 1 else run.tokens * 8  # pad(labels)[..., 1:].contiguous()
    loss_cells = run.block(rows * s.vocab_size * ITEMSIZE[loss_dtype])
    return dict(
        loss_saved=loss_cells + run.block(labels) + run.block(4),  # log_softmax output, target, total_weight
        unseen=0,
        logits=logits.storage,
        loss_upcast=upcast,
        loss_shifted=loss_cells if layout.shifted_copy else 0,
        loss_head=logits.storage if layout.keeps_head_output or not upcast else 0,
        loss_cells=loss_cells,
        chunk_peak=0,
        loss_backward=2 * loss_cells,
    )


# finetune/lora.py: model(input_ids, lm_head_chunk_size=128); utils.chunked_cross_entropy(chunk_size=128).
LITGPT_HEAD_CHUNK = 128


def _litgpt_head_dequantised(run: _Run) -> int:
    """The quantised lm_head dequantised for one chunk's matmul: fp16, then its bf16 copy (SRC_FABRIC_NF4)."""
    if run.quantization == "none" or run.full_ft:
        return 0
    return run.block(run.shape.vocab_size * run.shape.hidden_size * 2) * 2


def _litgpt_loss_bytes(run: _Run, logits: _T) -> dict[str, int]:
    """The `_Activations` loss fields of litgpt's training step (SRC_LITGPT).

    LoRA: the head runs on 128-token chunks and returns them as a list, which the training loop holds
    through backward; cross-entropy runs per chunk in the logits' own dtype (no fp32 copy) and keeps
    each chunk's log-softmax. Backward swaps each log-softmax for its gradient one chunk at a time.
    Full fine-tuning: one logits tensor, and `logits[..., :-1, :].reshape(-1, V)` copies it when the
    micro-batch has more than one row; backward gathers the chunks' gradients into one before the
    head's. A quantised head is dequantised for every chunk, in forward and in backward.
    """
    s, size = run.shape, ITEMSIZE[logits.dtype]
    cells = run.block(run.tokens * s.vocab_size * size)
    chunk = run.block(run.batch * min(LITGPT_HEAD_CHUNK, run.seq) * s.vocab_size * size)
    dequantised = _litgpt_head_dequantised(run)
    labels = run.block(run.tokens * 8)
    if run.full_ft:
        shifted = cells if run.batch > 1 else 0
        in_flight, backward = 0, logits.storage + cells
    else:
        shifted = 0
        # The last chunk, sliced to drop its last position, is copied by reshape when b > 1. A quantised
        # head's dequantisation comes before any log-softmax exists: beside the logits, it counts only
        # where it outweighs them (the forward moment adds the log-softmax cells to this).
        in_flight = max(chunk if run.batch > 1 else 0, dequantised - cells)
        backward = logits.storage + max(2 * chunk, dequantised)
    return dict(
        loss_saved=cells + labels + run.block(4),
        unseen=0,
        logits=logits.storage,
        loss_upcast=0,
        loss_shifted=shifted,
        loss_head=logits.storage,
        loss_cells=cells,
        chunk_peak=in_flight,
        loss_backward=backward,
    )


def _chunked_loss_bytes(run: _Run) -> dict[str, int]:
    """The `_Activations` loss fields of trainer/chunked_loss.py: its forward keeps the gradients
    it made (the head's input, and the head's weight and bias when they train) and, one chunk at a
    time, that chunk's logits and their fp32 scores, overwritten in place into the softmax and the
    gradient."""
    s = run.shape
    size = ITEMSIZE[run.compute_dtype]
    cells = min(run.loss_chunk, run.tokens) * s.vocab_size
    logits, scores = run.block(cells * size), run.block(cells * 4)
    # The scores become the softmax and then the gradient in place; Gemma 2's soft-cap keeps its tanh beside them.
    in_flight = 2 * scores if s.final_logit_softcap else scores
    if size != 4:  # 16-bit logits beside their fp32 copy, and the gradient beside its 16-bit copy
        in_flight = max(in_flight, scores + logits)
    if run.autocast:  # one autocast-dtype copy of the head's weight for the loop, and each chunk's weight gradient
        weight = run.block(s.vocab_size * s.hidden_size * size)
        in_flight += weight * (2 if run.full_ft else 1)
    made = run.block(run.tokens * s.hidden_size * ITEMSIZE[run.param_dtype])
    if run.full_ft:
        made += run.block(s.vocab_size * s.hidden_size * ITEMSIZE[run.param_dtype])
        if s.lm_head_bias:
            made += run.block(s.vocab_size * ITEMSIZE[run.param_dtype])
    return dict(
        loss_saved=made,
        unseen=made,  # kept on the autograd ctx, not saved: saved-tensor hooks never see them
        logits=0,
        loss_upcast=0,
        loss_shifted=0,
        loss_head=0,
        loss_cells=0,
        chunk_peak=in_flight,
        loss_backward=0,
    )


# --- persistent state: parameters, gradients, optimizer states ----------------------------------
@dataclass(frozen=True)
class _Tensor:
    """A trainable parameter tensor: rows × cols (cols 0 for a vector)."""

    rows: int
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * max(self.cols, 1)


def _all_tensors(s: ModelShape) -> list[_Tensor]:
    """Every parameter tensor of the model (counted once when tied)."""
    norm = [_Tensor(s.hidden_size, 0)] * (2 if s.norm == "layernorm" else 1)
    layer: list[_Tensor] = []
    for linear in s.linear_layers():
        layer.append(_Tensor(linear.d_out, linear.d_in))
        if linear.bias:
            layer.append(_Tensor(linear.d_out, 0))
    layer += norm * s.norms_per_layer
    tensors = [_Tensor(s.vocab_size, s.hidden_size)] + layer * s.num_layers + norm
    if s.learned_positions:
        tensors.append(_Tensor(s.learned_positions, s.hidden_size))
    if not s.tied_embeddings:
        tensors.append(_Tensor(s.vocab_size, s.hidden_size))
    if s.lm_head_bias:
        tensors.append(_Tensor(s.vocab_size, 0))
    return tensors


def _lora_tensors(run: _Run) -> list[_Tensor]:
    adapted = [linear for linear in run.shape.linear_layers() if linear.name in run.lora_targets]
    per_layer = [t for lin in adapted for t in (_Tensor(run.lora_r, lin.d_in), _Tensor(lin.d_out, run.lora_r))]
    return per_layer * run.shape.num_layers


def _trainable(run: _Run) -> tuple[list[_Tensor], str]:
    """The tensors the optimizer updates and their dtype."""
    if run.full_ft:
        return _all_tensors(run.shape), run.param_dtype
    return _lora_tensors(run), run.lora_dtype


def _blocks_note(run: _Run) -> str:
    """What a formula adds on CUDA, where every tensor is rounded up to whole 512-byte blocks."""
    return f", each tensor rounded up to {CUDA_BLOCK_BYTES} B" if run.device == "cuda" else ""


def _source(run: _Run, source: str) -> str:
    return f"{source}; {SRC_CUDA_BLOCKS}" if run.device == "cuda" else source


def _buffer_term(run: _Run) -> Term | None:
    """Buffers big enough to count: GPTBigCode keeps a max_positions² bool causal-mask table on the
    device (64 MiB for StarCoder's 8,192 positions); every rank keeps it whole. Rotary inv_freq
    tables are a few hundred bytes and left out."""
    s = run.shape
    if s.model_type != "gpt_bigcode":
        return None
    return Term(
        "buffers: causal-mask table",
        run.block(s.max_positions * s.max_positions),
        f"{s.max_positions:,}² × 1 B (bool)",
        "transformers modeling_gpt_bigcode.GPTBigCodeModel: self.bias = tril(ones(n_positions, n_positions, bool))",
    )


def _parameter_terms(run: _Run) -> list[Term]:
    s, size = run.shape, ITEMSIZE[run.param_dtype]
    total = s.parameter_count()
    rounded = _blocks_note(run)
    terms = []
    if run.quantization == "none":
        nbytes = run.blocks((t.numel for t in _all_tensors(s)), size)
        terms.append(
            Term(f"parameters ({run.param_dtype})", nbytes, f"{total:,} × {size} B{rounded}", _source(run, SRC_ZERO))
        )
    else:
        linears = [linear.d_in * linear.d_out for linear in s.linear_layers()] * s.num_layers
        if run.litgpt:
            linears.append(s.vocab_size * s.hidden_size)  # Fabric quantises lm_head as well (SRC_FABRIC_NF4)
        weights = sum(linears)
        rest = total - weights
        rest_bytes = run.blocks((t.numel for t in _all_tensors(s)), size) - run.blocks(linears, size)
        if run.quantization == "nf4":
            quantised = run.blocks(linears, run.nf4_bytes)
            per_param = (
                "0.5 + 1/64 + 4/16384) B (nf4, double quant)" if run.double_quantization else "0.5 + 4/64) B (nf4)"
            )
            formula, source = f"{weights:,} × ({per_param}", SRC_QLORA
        else:
            outputs = [linear.d_out for linear in s.linear_layers()] * s.num_layers + (
                [s.vocab_size] if run.litgpt else []
            )
            rows = sum(outputs)
            quantised = run.blocks(linears, 1) + run.blocks(outputs, 4)
            formula, source = f"{weights:,} × 1 B + {rows:,} row scales × 4 B (int8)", SRC_INT8
        terms.append(
            Term(
                f"parameters, quantised linears ({run.quantization})",
                quantised,
                formula + rounded,
                _source(run, source),
            )
        )
        terms.append(
            Term(
                f"parameters, embeddings/norms/head ({run.param_dtype})",
                rest_bytes,
                f"{rest:,} × {size} B{rounded}"
                + (", cast by prepare_model_for_kbit_training" if run.kbit_prepared else ""),
                _source(run, SRC_PEFT_KBIT if run.kbit_prepared else SRC_QLORA),
            )
        )
    if not run.full_ft:
        adapters = _lora_tensors(run)
        lora = sum(t.numel for t in adapters)
        lsize = ITEMSIZE[run.lora_dtype]
        terms.append(
            Term(
                f"LoRA adapters ({run.lora_dtype})",
                run.blocks((t.numel for t in adapters), lsize),
                f"{lora:,} = L × Σ r·(d_in + d_out) over {sorted(run.lora_targets)} × {lsize} B{rounded}",
                _source(run, f"{SRC_LORA}; {SRC_PEFT_DTYPE}"),
            )
        )
    return terms


def _gradient_term(run: _Run) -> Term:
    tensors, dtype = _trainable(run)
    numel = sum(t.numel for t in tensors)
    what = "all parameters" if run.full_ft else "LoRA adapters only (frozen base: no gradients)"
    return Term(
        "gradients",
        run.blocks((t.numel for t in tensors), ITEMSIZE[dtype]),
        f"{numel:,} trainable × {ITEMSIZE[dtype]} B ({what}){_blocks_note(run)}",
        _source(run, SRC_ZERO if run.full_ft else SRC_LORA),
    )


def _bnb_8bit_state(run: _Run, t: _Tensor) -> int:
    if t.numel < BNB_MIN_8BIT_SIZE:
        return 2 * run.block(4 * t.numel)  # small tensors keep 32-bit states
    blocks = -(-t.numel // BNB_BLOCK)
    return 2 * run.block(t.numel) + 2 * run.block(4 * blocks) + run.block(BNB_QMAP_BYTES)


def _optimizer_term(run: _Run) -> Term:
    tensors, dtype = _trainable(run)
    numel = sum(t.numel for t in tensors)
    size = ITEMSIZE[dtype]
    name, rounded = run.optimizer, _blocks_note(run)
    if name == "adamw":
        # exp_avg and exp_avg_sq in the parameter's dtype; the step counter is a CPU scalar.
        steps = 4 * len(tensors) if run.device == "cpu" else 0
        return Term(
            "optimizer states (AdamW m, v)",
            2 * run.blocks((t.numel for t in tensors), size) + steps,
            f"2 × {numel:,} × {size} B" + (f" + {len(tensors)} step scalars × 4 B" if steps else "") + rounded,
            _source(run, SRC_ADAMW),
        )
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        state = sum(_bnb_8bit_state(run, t) for t in tensors)
        return Term(
            f"optimizer states ({name})",
            state,
            f"2 × {numel:,} × 1 B + fp32 absmax per {BNB_BLOCK} + 32-bit below {BNB_MIN_8BIT_SIZE} elements{rounded}",
            _source(run, SRC_BNB_8BIT),
        )
    if name == "paged_adamw":
        return Term(
            "optimizer states (paged AdamW, fp32)",
            2 * run.blocks((t.numel for t in tensors), 4),
            f"2 × {numel:,} × 4 B{rounded}",
            _source(run, SRC_BNB_8BIT),
        )
    if name == "adafactor":
        # Factored second moment: a row and a column vector per matrix; vectors keep a full one.
        # The states are made `.to(grad)` after a 16-bit gradient is upcast (`grad.float()`), and
        # the RMS is a 0-dim tensor of the fp32 parameter: fp32 whatever the parameters' dtype.
        cells = sum(t.rows + t.cols if t.cols else t.numel for t in tensors)
        state = sum(
            run.block(4 * t.rows) + run.block(4 * t.cols) if t.cols else run.block(4 * t.numel) for t in tensors
        )
        return Term(
            "optimizer states (Adafactor row/col second moments, fp32)",
            state + len(tensors) * run.block(4),
            f"Σ (rows + cols) = {cells:,} × 4 B + fp32 RMS scalar per tensor{rounded}",
            _source(run, SRC_ADAFACTOR),
        )
    return Term("optimizer states (SGD, no momentum)", 0, "momentum 0 keeps no buffer", "torch.optim.SGD")


def _optimizer_transient(run: _Run) -> Term:
    """Temporaries of optimizer.step(): CUDA runs the foreach path over all tensors at once, the
    CPU the single-tensor path one parameter at a time."""
    tensors, dtype = _trainable(run)
    size = ITEMSIZE[dtype]
    numel = sum(t.numel for t in tensors)
    largest = max((t.numel for t in tensors), default=0)
    name, cuda, rounded = run.optimizer, run.device == "cuda", _blocks_note(run)
    if name == "adamw":
        if cuda:
            return Term(
                "optimizer temporaries (foreach sqrt(v))",
                run.blocks((t.numel for t in tensors), size),
                f"{numel:,} × {size} B{rounded}",
                _source(run, SRC_FOREACH),
            )
        return Term(
            "optimizer temporaries (sqrt(v) / bias correction)",
            2 * largest * size,
            f"2 × largest tensor {largest:,} × {size} B",
            SRC_ADAMW,
        )
    if name == "adafactor":
        return Term(
            "optimizer temporaries (Adafactor update)",
            3 * run.block(largest * 4),
            f"3 × largest tensor {largest:,} × 4 B (fp32 update){rounded}",
            _source(run, SRC_ADAFACTOR),
        )
    if name == "sgd" and run.weight_decay > 0:
        count = numel if cuda else largest
        nbytes = run.blocks((t.numel for t in tensors), size) if cuda else largest * size
        return Term(
            "optimizer temporaries (grad + wd·param)", nbytes, f"{count:,} × {size} B{rounded}", "torch.optim.SGD"
        )
    return Term("optimizer temporaries", 0, "updates in place", "torch.optim.SGD" if name == "sgd" else SRC_BNB_8BIT)


# --- transients around the layers -------------------------------------------------------------
def _layer_transients(run: _Run, acts: _Activations) -> tuple[int, int]:
    """(forward, backward) bytes a layer holds beyond the saved activations while it runs.

    Forward: eager attention builds the scores, scales and masks them (two b·a·s² live at once;
    softmax(dtype=float32) converts a 16-bit input first). Backward runs the MLP first (three
    b·s·i gradients live at once for a gated MLP), frees the MLP's saved tensors, then the
    attention: softmax's backward holds the incoming and outgoing gradient of the probabilities
    (and on CUDA their product, which its kernel makes first) while the dropout mask and dropped
    copy are already freed. With checkpointing the layer's
    activations are recomputed first and live through its backward.
    """
    s, cd, block = run.shape, ITEMSIZE[run.compute_dtype], run.block
    square = run.batch * s.num_heads * run.seq * run.seq
    wide = block(run.tokens * s.intermediate_size * cd)
    softmax = ITEMSIZE[_softmax_dtype(run)]
    if run.attention in ("eager", "sdpa_math"):
        kept_squares = acts.layer_tags.get("attention scores", 0)
        # Before softmax: scores and their scaled copy; at softmax: the masked scores, their fp32
        # conversion and the output. Net of what the layer keeps, which does not exist yet.
        upcast = block(square * softmax) if softmax != cd else 0
        scores = block(square * cd)
        attn_forward = max(0, max(2 * scores, scores + upcast + block(square * softmax)) - kept_squares)
        # CUDA's softmax backward also makes `tmp = grad * output` first (SRC_CUDA_SOFTMAX_BACKWARD).
        gradients = (3 if run.device == "cuda" else 2) * block(square * softmax)
        attn_backward = max(0, gradients - (kept_squares - block(square * softmax)))
    else:
        attn_forward = 0
        q, kv = run.tokens * s.head_dim * s.num_heads, run.tokens * s.head_dim * s.num_kv_heads
        qkv = block(q * cd) + 2 * block(kv * cd)
        attn_backward = qkv + (block(q * 4) if run.device == "cuda" else 0)
    mlp_backward = (3 if s.gated_mlp or (s.activation == "gelu_new" and not run.litgpt) else 2) * wide
    mlp_kept = acts.layer_tags.get("mlp", 0)
    forward = max(attn_forward, wide)
    if run.attention == "eager" and not run.checkpointing:
        forward += block(run.batch * run.seq * run.seq * ITEMSIZE[run.param_dtype])  # the (b, 1, s, s) causal mask
    residual = block(run.tokens * s.hidden_size * cd)  # the gradient flowing down the residual stream
    backward = max(mlp_backward + 2 * residual, attn_backward - mlp_kept + residual)
    if run.quantization != "none":
        # bitsandbytes dequantises a weight to 16 bits for each matmul, forward and backward.
        # litgpt's Fabric quantised from fp16: the fp16 dequantisation and its bf16 copy (SRC_FABRIC_NF4).
        dequantised = block(max(linear.d_in * linear.d_out for linear in s.linear_layers()) * 2) * (
            2 if run.litgpt else 1
        )
        forward, backward = forward + dequantised, backward + dequantised
    if run.checkpointing:
        forward += wide
        backward += acts.layer_full
    return forward, backward


# --- moments of the step ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Moment:
    phase: str
    breakdown: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())


def _moment(phase: str, **parts: int) -> _Moment:
    return _Moment(phase, {key: int(parts.get(key, 0)) for key in BREAKDOWN_KEYS})


@dataclass(frozen=True)
class _Persistent:
    parameters: int
    gradients: int
    optimizer_states: int
    optimizer_transient: int
    states_paged: bool  # bitsandbytes paged states: evicted to host under pressure, resident in step()


def _grad_fractions(run: _Run) -> tuple[float, float]:
    """Shares of the gradient bytes that belong to one decoder layer and to the embeddings: what
    is still missing while layer 0 and then the embeddings run their backward."""
    s = run.shape
    tensors, _ = _trainable(run)
    total = sum(t.numel for t in tensors) or 1
    if not run.full_ft:
        return 1 / s.num_layers, 0.0  # adapters live in the layers only
    embeddings = (s.learned_positions + (0 if s.tied_embeddings else s.vocab_size)) * s.hidden_size
    return s.layer_parameters() / total, embeddings / total


def _moments(
    run: _Run,
    acts: _Activations,
    st: _Persistent,
    gathered: Gathered,
    kept_gradients: int,
    kept_cache: int = 0,
    first: bool = False,
) -> list[_Moment]:
    """The candidate peaks of a steady-state step (optimizer states already exist), or with `first`
    of the run's first micro-batch (no optimizer states, gradients or earlier graph yet).

    `kept_gradients`: input gradients FSDP keeps to the end of backward (_fsdp_kept_input_gradients),
    which also keeps every checkpointed input alive through layer 0's backward. `kept_cache`: every
    layer's key/value cache, alive until the forward returns (_kept_training_cache)."""
    s = run.shape
    activations = acts.total(s.num_layers)
    # Later micro-batches of an accumulation run forward and backward on top of the gradients.
    held = st.gradients if run.accum > 1 and not first else 0
    states = 0 if st.states_paged or first else st.optimizer_states
    forward_t, backward_t = _layer_transients(run, acts)
    head_grad = run.block(s.vocab_size * s.hidden_size * ITEMSIZE[run.param_dtype]) if run.full_ft else 0
    common = dict(parameters=st.parameters, optimizer_states=states)
    loss_forward = acts.loss_saved + acts.at_loss
    # nll_loss's gradient and log_softmax's input gradient, both b·s·V in the loss's dtype, beside the saved output.
    loss_backward = acts.loss_saved + acts.loss_backward
    last_layer_rest = 0 if run.checkpointing else acts.layer_tags.get("mlp", 0)
    layer_share, embedding_share = _grad_fractions(run)
    before_layer0 = max(held, round(st.gradients * (1 - layer_share - embedding_share)))
    # The embedding's dense gradient is added into a tied lm_head's; accumulation adds every
    # gradient into the previous micro-batches' one tensor at a time.
    embedding_t = head_grad if s.tied_embeddings else 0
    if run.accum > 1 and not first:
        largest = run.block(s.largest_parameter() * ITEMSIZE[run.param_dtype]) if run.full_ft else 0
        embedding_t += max(head_grad, largest)
    # Kept input gradients keep every checkpointed input alive too; only the head's tensors are gone.
    layer0_activations = (
        activations - acts.head + kept_gradients if kept_gradients else acts.embedding + acts.mask + acts.first_layer
    )
    moments = [
        _moment(
            "forward",
            **common,
            gradients=held,
            activations=activations + kept_cache,
            logits_loss=loss_forward,
            transient=gathered.forward,
        ),
        # Inside the last layer's attention: its MLP, the head and the loss have kept nothing yet.
        _moment(
            "forward",
            **common,
            gradients=held,
            activations=activations - last_layer_rest - acts.head + kept_cache * (s.num_layers - 1) // s.num_layers,
            transient=forward_t + gathered.forward,
        ),
        _moment(
            "backward",
            **common,
            gradients=held,
            activations=activations,
            logits_loss=loss_backward,
            transient=gathered.backward,
        ),
        # The top layer's backward, with the lm_head's gradient just made.
        _moment(
            "backward",
            **common,
            gradients=held if gathered.holds_head_gradient else max(held, min(head_grad, st.gradients)),
            activations=activations,
            transient=backward_t + gathered.backward,
        ),
        # Layer 0's backward: every gradient but its own and the embeddings' exists.
        _moment(
            "backward",
            **common,
            gradients=before_layer0,
            activations=layer0_activations,
            transient=backward_t + gathered.backward,
        ),
        _moment(
            "backward",
            **common,
            gradients=st.gradients,
            activations=acts.embedding + acts.mask,
            transient=embedding_t + gathered.backward,
        ),
    ]
    if run.accum == 1 or not first:  # a first micro-batch that accumulates is not followed by a step
        moments.append(
            _moment(
                "optimizer",
                parameters=st.parameters,
                optimizer_states=st.optimizer_states,
                gradients=st.gradients,
                transient=st.optimizer_transient,
            )
        )
    if run.litgpt and not first:
        # The next micro-batch's forward returns its logits while the loop still holds the previous
        # ones, and through them the previous graph with what its ctx attributes keep (SRC_LITGPT_LOOP).
        moments.append(
            _moment(
                "forward",
                **common,
                gradients=held,
                activations=activations + acts.ctx_kept,
                logits_loss=2 * acts.logits + _litgpt_head_dequantised(run),
                transient=gathered.forward,
            )
        )
    return moments


# --- the estimate ---------------------------------------------------------------------------------
def _activation_terms(run: _Run, acts: _Activations) -> list[Term]:
    layers = run.shape.num_layers
    terms = []
    if acts.embedding:
        terms.append(Term("activations: embeddings", acts.embedding, "token ids (+ dropout mask)", SRC_MEASURED))
    if acts.mask:
        terms.append(
            Term(
                "activations: causal mask kept by checkpointing", acts.mask, "b·s² in the hidden dtype", SRC_CHECKPOINT
            )
        )
    what = "layer 0 (input needs no grad under LoRA)" if not run.full_ft else "layer 0"
    terms.append(Term(f"activations: {what}", acts.first_layer, "walked op by op", SRC_MEASURED))
    sources = {
        "attention scores": f"{SRC_KORTHIKANTI} (the 5·a·s²·b term)"
        + (f"; {SRC_EAGER_MASK}" if run.attention == "eager" and run.shape.model_type == "gpt2" else "")
        + (f"; {SRC_SDPA_GQA_MATH}" if run.attention == "sdpa_math" and run.device == "cuda" else ""),
        "attention": SRC_FLASH if run.attention in ("sdpa", "flash") else SRC_KORTHIKANTI,
        "lora": f"{SRC_LORA}; {SRC_PEFT_DTYPE}" + (f"; {SRC_DROPOUT}" if run.lora_dropout else ""),
        "autocast weight copies": SRC_AUTOCAST,
        "checkpointed layer input": SRC_CHECKPOINT,
        "norms": SRC_DROPOUT if run.shape.residual_dropout else SRC_MEASURED,
    }
    if run.litgpt:
        sources["lora"], sources["attention"] = SRC_LITGPT_LORA, f"{SRC_FLASH}; {SRC_LITGPT}"
    if run.quantization != "none":
        sources["attention"] = sources["mlp"] = SRC_BNB_MATMUL
    sources["bitsandbytes matmul inputs"] = SRC_BNB_1270
    for tag, size in sorted(acts.by_tag.items(), key=lambda item: -item[1]):
        source = sources.get(tag, SRC_MEASURED)
        terms.append(Term(f"activations per layer: {tag}", size * (layers - 1), f"{layers - 1} × {size:,} B", source))
    terms.append(Term("activations: final norm and lm_head input", acts.head, "walked op by op", SRC_MEASURED))
    if run.kbit_prepared:
        # The hidden states take the fp32 of the embedding and norm weights: every term above is walked in it.
        terms = [Term(t.name, t.bytes, t.formula, f"{t.source}; {SRC_PEFT_KBIT_ACTS}") for t in terms]
    return terms


def _logit_terms(run: _Run, acts: _Activations) -> list[Term]:
    if run.loss_chunk:
        chunk = min(run.loss_chunk, run.tokens)
        return [
            Term(
                "gradients the chunked loss made in forward",
                acts.loss_saved,
                "b·s·h of the head's input" + (", V·h of the head's weight" if run.full_ft else ""),
                SRC_CHUNKED_LOSS,
            ),
            Term(
                "one chunk's logits, log-softmax and their gradients",
                acts.chunk_peak,
                f"{chunk:,} tokens × V = {chunk * run.shape.vocab_size:,} cells",
                SRC_CHUNKED_LOSS,
            ),
        ]
    if run.litgpt:
        return _litgpt_logit_terms(run, acts)
    layout, cells = run.loss, run.tokens * run.shape.vocab_size
    rows = run.batch * (run.seq - 1) if layout.shifted_copy else run.tokens
    item = 4 if layout.upcast else ITEMSIZE[run.compute_dtype]
    source = SRC_HF_LOSS if layout.is_current else SRC_TRANSFORMERS_OLD_LOSS
    loss = f"{rows * run.shape.vocab_size:,} × {item} B"
    head = f"b·s·V = {cells:,} × {ITEMSIZE[run.compute_dtype]} B"
    terms = [Term("logits", acts.logits, head + ("" if acts.loss_head else ", freed by logits.float()"), source)]
    if acts.loss_upcast:
        terms.append(Term("logits fp32 upcast", acts.loss_upcast, f"{cells:,} × 4 B", source))
    if acts.loss_shifted:
        terms.append(Term("shifted logits copy", acts.loss_shifted, f"b·(s−1)·V = {loss}", source))
    return [
        *terms,
        Term("log-softmax kept for backward", acts.loss_saved, f"{loss} + labels", source),
        Term("loss gradient over the vocabulary", 2 * acts.loss_cells, f"2 × {loss} at backward start", source),
    ]


def _litgpt_logit_terms(run: _Run, acts: _Activations) -> list[Term]:
    cells = f"b·s·V = {run.tokens * run.shape.vocab_size:,} × {ITEMSIZE[run.compute_dtype]} B"
    how = "one tensor" if run.full_ft else f"{LITGPT_HEAD_CHUNK}-token chunks, held in a list through backward"
    terms = [Term("logits", acts.logits, f"{cells}, {how}", SRC_LITGPT)]
    if acts.loss_shifted:
        terms.append(Term("shifted logits copy", acts.loss_shifted, "logits[..., :-1, :].reshape(-1, V)", SRC_LITGPT))
    terms.append(Term("log-softmax kept for backward", acts.loss_saved, f"{cells} + labels", SRC_LITGPT))
    dequantised = _litgpt_head_dequantised(run)
    if dequantised:
        terms.append(
            Term("lm_head dequantised for a chunk", dequantised, "V·h × (2 B fp16 + 2 B bf16)", SRC_FABRIC_NF4)
        )
    return terms


PREVIOUS_GRAPH_TERM = "activations: the previous micro-batch's graph, held by litgpt's loop"


def _previous_graph_terms(run: _Run, acts: _Activations) -> list[Term]:
    """What litgpt's loop still holds of the previous micro-batch while the next forward runs."""
    terms = [
        Term(
            "logits of the previous micro-batch, held by litgpt's loop",
            acts.logits,
            "b·s·V, until the next forward returns",
            SRC_LITGPT_LOOP,
        )
    ]
    if acts.ctx_kept:
        terms.append(
            Term(
                PREVIOUS_GRAPH_TERM,
                acts.ctx_kept,
                f"every {'8' if run.quantization == 'int8' else '4'}-bit linear's input, kept on its bitsandbytes "
                "matmul's ctx until the graph goes",
                f"{SRC_LITGPT_LOOP}; {SRC_BNB_1270}",
            )
        )
    return terms


def _notes(run: _Run, cfg: RunConfig, device: str) -> list[str]:
    s = run.shape
    notes = []
    if device == "cuda":
        notes.append(
            f"every tensor counted is rounded up to a multiple of {CUDA_BLOCK_BYTES} bytes, as the CUDA caching "
            "allocator does and max_memory_allocated counts (kMinBlockSize, c10/cuda/CUDACachingAllocator.cpp)"
        )
        notes.append(reserve_note())
    if run.attention == "sdpa_math" and run.device == "cpu":
        notes.append("sdpa with attention dropout on the CPU falls back to the math kernel, which keeps b·a·s² scores")
    if run.attention == "sdpa_math" and run.device == "cuda":
        notes.append(
            "fp32 sdpa with grouped-query attention runs CUDA's math kernel (transformers passes enable_gqa, which "
            "only the 16-bit flash kernel takes): it keeps the b·a·s² probabilities as eager attention does; "
            "bf16 weights or train.mixed_precision: bf16 reach the flash kernel"
        )
    if cfg.model.attn_implementation == "sdpa" and s.attn_logit_softcap:
        notes.append(
            f"transformers refuses sdpa for {s.model_type} (soft-capped attention): estimated as eager; "
            "set model.attn_implementation to eager or flash_attention_2"
        )
    if run.quantization != "none":
        per_weight = "4 B (fp16, then its bf16 copy: Fabric quantised from fp16)" if run.litgpt else "2 B"
        notes.append(
            f"bitsandbytes dequantises each quantised weight for its matmul: the largest d_in·d_out × {per_weight} "
            "is counted as a transient; its kernels' workspaces are not"
        )
    if run.litgpt:
        notes.append(
            "walked as litgpt's own GPT (model.implementation: litgpt): one qkv linear with one LoRA dropout, "
            "adapters in the weights' dtype, the head and a bf16 loss in 128-token chunks held through backward"
            + (", lm_head quantised too" if run.quantization != "none" else "")
            + "; its loop holds the previous micro-batch's logits, and with them that graph"
            + (" and every 4-bit linear's input (bitsandbytes < 0.43.2)" if run.bnb_keeps_input else "")
            + (" and every 8-bit linear's input" if run.quantization == "int8" else "")
            + ", until the next forward returns"
        )
    if cfg.train.num_gpus > 1 and not zero_stage(cfg) and not fsdp_strategy(cfg):
        notes.append("data parallel without ZeRO: every rank holds everything; DDP gradient buckets not counted")
    if cfg.fsdp is not None and cfg.train.num_gpus == 1 and cfg.fsdp.sharding_strategy != "no_shard":
        notes.append("FSDP on one GPU switches itself to NO_SHARD: nothing is sharded; set train.num_gpus")
    if fsdp_strategy(cfg):
        adapters = (
            "; LoRA adapters wrapped apart (peft's fsdp_auto_wrap_policy), so frozen units get no gradient "
            "(an adapter sharing a unit with frozen weights would cost gradients as if nothing were frozen)"
            if cfg.lora is not None
            else ""
        )
        notes.append(
            "FSDP: one unit per decoder layer (transformer-based wrap), the same bytes as FSDP2's per-parameter "
            f"sharding{adapters}"
        )
    if cfg.train.num_gpus > 1:
        notes.append("NCCL communication buffers are not counted")
    if cfg.train.optimizer.startswith("paged"):
        notes.append("paged optimizer states live in CUDA unified memory: counted only during optimizer.step()")
    return notes


def _kbit_note(run: _Run, cfg: RunConfig, acts: _Activations) -> str | None:
    """What prepare_model_for_kbit_training costs over keeping the dense weights in model.dtype."""
    if not run.kbit_prepared or cfg.model.dtype == "fp32":
        return None
    s = run.shape
    plain = dataclasses.replace(run, param_dtype=cfg.model.dtype, kbit_prepared=False)
    activations = acts.total(s.num_layers) - _walk(plain).total(s.num_layers)
    linears = [linear.d_in * linear.d_out for linear in s.linear_layers() * s.num_layers]
    dense = [t.numel for t in _all_tensors(s)]
    weights = (run.blocks(dense, 4) - run.blocks(linears, 4)) - (
        run.blocks(dense, ITEMSIZE[cfg.model.dtype]) - run.blocks(linears, ITEMSIZE[cfg.model.dtype])
    )
    return (
        "model.prepare_for_kbit_training: peft.prepare_model_for_kbit_training casts the non-quantised weights "
        f"(embeddings, norms, lm_head) from {cfg.model.dtype} to fp32 (+{weights / BYTES_PER_MIB:,.0f} MiB), and "
        f"the hidden states between the quantised matmuls follow them (activations +{activations / BYTES_PER_MIB:,.0f} "
        "MiB); set it false for training code that does not call it (litgpt; TRL skips it for sharded QLoRA)"
    )


_Redo = Callable[[Libraries], MemoryEstimate]  # the same estimate, run by other library versions


def estimate_analytic(
    cfg: RunConfig,
    *,
    device: str = "cuda",
    shape: ModelShape | None = None,
    bitsandbytes: str | None = None,
    transformers: str | None = None,
    torch: str | None = None,
    gpu: str | None = None,
    first_micro_batch: bool = False,
) -> MemoryEstimate:
    """Estimate one training step's memory from formulas (no torch, no transformers).

    `device` is where the step runs: "cuda" adds the CUDA context, rounds every tensor up to the
    caching allocator's 512-byte blocks and uses CUDA's kernels' rules (bool dropout masks, fused
    SDPA with dropout, foreach optimizers); "cpu" matches the runner on the CPU. `bitsandbytes` and
    `transformers` (and `torch`) are the versions that run the step (a recorded run's, a published
    one's); by default the ones installed here, and current behaviour where there are none. `gpu`
    names the card (its compute capability sets the cuBLAS workspace; diagnosis.gpus).

    By default the step is a steady-state one: earlier micro-batches left their optimizer states,
    accumulated gradients and whatever graph the training loop still holds. `first_micro_batch`
    estimates the run's first instead, before any of that exists: where a loop feeds its longest
    batch first (lit-gpt did), that is where the run peaks.
    """
    shape = shape or shape_for(cfg.model.name)
    libraries = Libraries.that_run(bitsandbytes=bitsandbytes, transformers=transformers, torch=torch)
    estimate = _estimate(cfg, device, shape, libraries, compute_capability_of(gpu), first_micro_batch)

    def redo(changed: Libraries) -> MemoryEstimate:
        return _estimate(cfg, device, shape, changed, first_micro_batch=first_micro_batch)

    notes = [
        note
        for note in (
            _bitsandbytes_note(cfg, libraries, estimate, redo),
            _loss_layout_note(shape, libraries, estimate, redo),
            _training_cache_note(estimate, libraries, shape),
            _lost_checkpointing_note(cfg, shape, libraries, estimate, redo),
        )
        if note
    ]
    return dataclasses.replace(estimate, notes=(*estimate.notes, *notes)) if notes else estimate


def _lost_checkpointing_note(
    cfg: RunConfig, shape: ModelShape, libraries: Libraries, estimate: MemoryEstimate, redo: _Redo
) -> str | None:
    """A run that asks for checkpointing and does not get it needs telling, with what it would save."""
    if not (cfg.model.gradient_checkpointing and libraries.ignores_checkpointing(shape.model_type)):
        return None
    fixed = redo(dataclasses.replace(libraries, transformers=None))
    saves = estimate.peak_allocated_bytes - fixed.peak_allocated_bytes
    return (
        f"transformers {libraries.transformers} does not checkpoint {shape.model_type} "
        f"({CHECKPOINTING_LOST_AND_RESTORED}): gradient_checkpointing=true does nothing there, so this "
        f"estimate has none; transformers >= 5.0 checkpoints it ({human_bytes(max(saves, 0))} less on this peak)"
    )


def _training_cache_note(estimate: MemoryEstimate, libraries: Libraries, shape: ModelShape) -> str | None:
    kept = estimate.term_bytes(KEPT_CACHE_TERM)
    if not kept:
        return None
    return (
        f"transformers {libraries.transformers} keeps {shape.model_type}'s key/value cache through checkpointed "
        f"training ({human_bytes(kept)} to the end of the forward): model.config.use_cache = False before training, "
        "or transformers >= 4.53, drops it"
    )


def _loss_layout_note(shape: ModelShape, libraries: Libraries, estimate: MemoryEstimate, redo: _Redo) -> str | None:
    """What today's loss would change, for a run whose transformers computes it the old way: an
    upgrade that moves the peak is worth knowing before it happens."""
    layout = libraries.loss_layout(shape.model_type)
    if layout.is_current:
        return None
    today = redo(dataclasses.replace(libraries, transformers=None))
    change = today.peak_allocated_bytes - estimate.peak_allocated_bytes
    how = "on fp32 logits" if layout.upcast else "in the logits' own dtype"
    effect = f"{'+' if change > 0 else '−'}{human_bytes(abs(change))} on this peak" if change else "not at this peak"
    return (
        f"loss computed {how} over a shifted copy, as transformers {libraries.transformers} does for "
        f"{shape.model_type}; today's loss (4.49 on: fp32, no copy): {effect}"
    )


def _bitsandbytes_note(cfg: RunConfig, libraries: Libraries, estimate: MemoryEstimate, redo: _Redo) -> str | None:
    """What the bitsandbytes version is worth to this peak, when it matters (4-bit weights)."""
    version = libraries.bitsandbytes
    if cfg.model.quantization != "nf4":
        return None
    keeps = libraries.bnb_keeps_matmul_input
    if not keeps and version is not None:
        return None
    other = redo(dataclasses.replace(libraries, bitsandbytes=None if keeps else OLD_BITSANDBYTES))
    differs = human_bytes(abs(estimate.peak_allocated_bytes - other.peak_allocated_bytes))
    if keeps:
        return (
            f"bitsandbytes {version} keeps every 4-bit linear's input on its autograd ctx, which only the graph's "
            f"end frees (bitsandbytes#1270, fixed in 0.43.2): {differs} of this peak, which bitsandbytes >= 0.43.2 "
            "saves"
        )
    return (
        "bitsandbytes is not installed here: estimated as >= 0.43.2; an older one keeps every 4-bit linear's input "
        f"on its autograd ctx (+{differs} on this peak); name the version that runs (--bitsandbytes-version)"
    )


def fsdp_keeps_input_gradients(cfg: RunConfig, reentrant: bool) -> bool:
    """FSDP1 reshards a unit whose weights are all frozen (every decoder layer under LoRA) from a
    multi-grad hook on its forward input (_register_post_backward_reshard_only_hook). Under reentrant
    checkpointing that input is the checkpoint's detached copy: the hook's closure keeps it, and the
    gradient the checkpoint stores in its .grad, until backward ends. At layer 0's backward every
    other layer's input gradient is alive (reproduced on the CPU, torch 2.4.1 and 2.13, two ranks)."""
    return bool(fsdp_strategy(cfg)) and cfg.lora is not None and cfg.model.gradient_checkpointing and reentrant


KEPT_CACHE_TERM = "activations: key/value cache kept through the forward"


def _kept_training_cache(run: _Run, libraries: Libraries) -> int:
    """GPTBigCode before transformers 4.53 keeps `present`, a view of each layer's c_attn output, under
    checkpointing too (SRC_GPT_BIGCODE_CACHE): the whole output stays alive until the forward returns."""
    s = run.shape
    if not libraries.keeps_training_cache(s.model_type, run.checkpointing):
        return 0
    qkv = _linears(s)["qkv"]
    return s.num_layers * run.block(run.tokens * qkv.d_out * ITEMSIZE[run.compute_dtype])


def _fsdp_kept_input_gradients(run: _Run, cfg: RunConfig, acts: _Activations, reentrant: bool) -> int:
    if not fsdp_keeps_input_gradients(cfg, reentrant):
        return 0
    return (run.shape.num_layers - 1) * acts.per_layer  # per_layer is the checkpointed input under checkpointing


def workspaces_term(
    shape: ModelShape | None, quantization: str, libraries: Libraries, capability: tuple[int, int] | None
) -> Term:
    """The cuBLAS workspaces a CUDA step's matmuls keep (diagnosis.workspaces), for both estimators.
    A biased linear adds the cuBLASLt one, unless bitsandbytes runs the linears; an unknown `shape`
    is taken as having none (1 MiB less on torch 2.9-2.11)."""
    biased = (
        shape is not None
        and quantization == "none"
        and (shape.lm_head_bias or any(linear.bias for linear in shape.linear_layers()))
    )
    kept = cublas_workspaces(capability, libraries.torch_release, biased)
    return Term("cuBLAS workspaces", kept.bytes, kept.formula, SRC_WORKSPACES)


def _estimate(
    cfg: RunConfig,
    device: str,
    shape: ModelShape,
    libraries: Libraries,
    capability: tuple[int, int] | None = None,
    first_micro_batch: bool = False,
) -> MemoryEstimate:
    """`capability` is the card's (None: not known); it sets only the workspaces, a constant that
    cancels where two estimates are compared."""
    if cfg.model.implementation == "litgpt":
        shape = dataclasses.replace(shape, tied_embeddings=False)  # litgpt's GPT has its own lm_head weight
    run = _resolve(cfg, shape, device, libraries)
    acts = _walk(run)
    parameter_terms = _parameter_terms(run)
    grad, states, opt_temp = _gradient_term(run), _optimizer_term(run), _optimizer_transient(run)
    unsharded = {
        "parameters": sum(term.bytes for term in parameter_terms),
        "gradients": grad.bytes,
        "optimizer_states": states.bytes,
        "optimizer_transient": opt_temp.bytes,
    }
    sharded, shard_terms = shard_components(unsharded, cfg)
    buffers = _buffer_term(run)
    persistent = _Persistent(
        parameters=sharded["parameters"] + (buffers.bytes if buffers else 0),
        gradients=sharded["gradients"],
        optimizer_states=sharded["optimizer_states"],
        optimizer_transient=sharded["optimizer_transient"],
        states_paged=cfg.train.optimizer.startswith("paged"),
    )
    gathered = gathered_parameter_bytes(shape, cfg)
    kept_gradients = _fsdp_kept_input_gradients(run, cfg, acts, libraries.checkpoints_reentrantly and run.checkpointing)
    kept_cache = _kept_training_cache(run, libraries)
    moments = _moments(run, acts, persistent, gathered, kept_gradients, kept_cache, first_micro_batch)
    peak = max(moments, key=lambda moment: moment.total)
    runtime = CUDA_CONTEXT_BYTES if run.device == "cuda" else 0
    terms = [
        *parameter_terms,
        *([buffers] if buffers else []),
        grad,
        states,
        opt_temp,
        *shard_terms,
        *_activation_terms(run, acts),
        *_logit_terms(run, acts),
    ]
    if gathered:
        terms.append(gathered.term())
    if kept_cache:
        terms.append(
            Term(
                KEPT_CACHE_TERM,
                kept_cache,
                f"{run.shape.num_layers} layers × b·s·(q + k + v) of c_attn's output, to the end of the forward",
                SRC_GPT_BIGCODE_CACHE,
            )
        )
    if run.litgpt and not first_micro_batch:
        terms.extend(_previous_graph_terms(run, acts))
    if kept_gradients:
        terms.append(
            Term(
                "activations: layer input gradients FSDP keeps to the end of backward",
                kept_gradients,
                f"({shape.num_layers} - 1) × b·s·h in the hidden dtype, beside every checkpointed input, at layer 0",
                f"torch FSDP1 _runtime_utils._register_post_backward_reshard_only_hook + reentrant "
                f"torch.utils.checkpoint; {SRC_TRANSFORMERS_REENTRANT}",
            )
        )
    reserve = allocator_reserve_bytes(peak.total) if run.device == "cuda" else 0
    if reserve:
        terms.append(reserve_term(peak.total))
    # Held from the first step's backward on, at every moment: it moves no peak, it adds to each.
    workspaces = workspaces_term(shape, run.quantization, libraries, capability) if run.device == "cuda" else None
    breakdown = peak.breakdown | {"workspaces": workspaces.bytes if workspaces else 0}
    if workspaces:
        terms.append(workspaces)
    if runtime:
        terms.append(Term("CUDA context", runtime, "300 MiB", SRC_CONTEXT))
    activations = acts.total(shape.num_layers)
    return MemoryEstimate(
        mode="analytic",
        breakdown=breakdown,
        peak_phase=peak.phase,
        allocator_overhead_bytes=reserve,
        runtime_overhead_bytes=runtime,
        totals={
            "parameters": persistent.parameters - (buffers.bytes if buffers else 0),
            "buffers": buffers.bytes if buffers else 0,
            "gradients": persistent.gradients,
            "optimizer_states": persistent.optimizer_states,
            "activations": activations,
            "logits_loss": acts.loss_saved + max(acts.at_loss, acts.loss_backward),
            # What the runner's ActivationCounter measures: the storages saved-tensor hooks see.
            "saved_for_backward": acts.hooks_see(shape.num_layers),
            "optimizer_transient": persistent.optimizer_transient,
        },
        per_layer_activation_bytes=acts.per_layer or acts.first_layer,
        terms=tuple(terms),
        notes=tuple(note for note in (*_notes(run, cfg, run.device), _kbit_note(run, cfg, acts)) if note),
    )
