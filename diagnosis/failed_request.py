"""Which tensor the failed allocation was: its size read against the shapes a training step makes.

An OOM names one number, the request that did not fit. Against the config it is rarely anonymous:
500.0 MiB on a 4 × 1,024-token batch over a 32,000-token vocabulary is 4 × 1,024 × 32,000 × 4 B,
the logits' fp32 copy the loss makes; 512.0 MiB under eager attention at 4,096 tokens is
2 × 4 heads × 4,096 × 4,096 × 4 B, the attention scores. Naming it says which part of the step
broke the budget, which is what the fix has to shrink.

A size is compared with each candidate as the allocator would have asked for it: the CPU allocator
asks for the tensor's bytes; the CUDA caching allocator's message and OOM observer give the block
it tried to get (`Tried to allocate` is rounded to 512 B, then to 2 MiB above 10 MiB; smaller
requests become 2 or 20 MiB blocks and are too coarse to name). A size read back from a message's
"%.2f MiB|GiB" text is matched within that precision. Several tensors can share a size (the fp32
logits, their log-softmax and its gradient); they are named together, as one match.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from diagnosis.analytic import ITEMSIZE, LITGPT_HEAD_CHUNK, step_facts
from diagnosis.architecture import ArchitectureError, ModelShape, shape_for
from diagnosis.units import GIB, MIB, human_bytes
from trainer.config import RunConfig

CUDA_BLOCK = 512
CUDA_ROUND_LARGE = 2 * MIB
CUDA_MIN_LARGE_ALLOC = 10 * MIB
# Below this a request is one of thousands of small tensors: naming it would be a guess. On CUDA a
# tensor under 10 MiB gets a 20 MiB block, so its size no longer says which tensor it was.
SMALLEST_NAMED = 8 * MIB
_SMALLEST_TENSOR = {"cuda": CUDA_MIN_LARGE_ALLOC, "cpu": SMALLEST_NAMED}
CPU_ALIGNMENT = 64

# Where each kind of tensor lives in the step, in oom_text's location vocabulary.
LOGITS_LOSS = "logits_loss"
ATTENTION = "attention"
MLP = "mlp"
HIDDEN = "hidden"
WEIGHTS = "weights"


@dataclass(frozen=True)
class RequestMatch:
    """One tensor (or several of one shape) the failed request is the size of."""

    what: str  # "the logits' fp32 copy (the loss upcasts them), their log-softmax or its gradient"
    dims: tuple[tuple[str, int], ...]  # (("batch", 4), ("tokens", 1024), ("vocab", 32000))
    dtype: str
    nbytes: int  # the tensor's own bytes (before any allocator rounding)
    location: str  # LOGITS_LOSS, ATTENTION, MLP, HIDDEN or WEIGHTS

    @property
    def formula(self) -> str:
        sizes = " × ".join(f"{value:,}" for _, value in self.dims)
        return f"{sizes} × {ITEMSIZE[self.dtype]} B ({', '.join(name for name, _ in self.dims)}; {self.dtype})"

    def to_json(self) -> dict:
        return {
            "what": self.what,
            "dims": dict(self.dims),
            "dtype": self.dtype,
            "bytes": self.nbytes,
            "location": self.location,
            "formula": self.formula,
        }


def cuda_block_bytes(nbytes: int) -> int:
    """The block the CUDA caching allocator asks the driver for, the size its OOM reports."""
    size = max(CUDA_BLOCK, -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK)
    if size <= MIB:
        return 2 * MIB
    if size < CUDA_MIN_LARGE_ALLOC:
        return 20 * MIB
    return -(-size // CUDA_ROUND_LARGE) * CUDA_ROUND_LARGE


def _litgpt_loss_candidates(
    add: Callable[..., None], compute: str, full_ft: bool, quantized: bool, b: int, s: int, v: int, h: int
) -> None:
    """litgpt's head and loss (analytic.SRC_LITGPT): LoRA runs them on 128-token chunks in bf16, full
    fine-tuning on the whole logits, and a 4-bit lm_head is dequantised to fp16 for each chunk."""
    if full_ft:
        add(
            "the logits (the LM head's output) or their shifted copy",
            (("batch", b), ("tokens", s), ("vocab", v)),
            compute,
            LOGITS_LOSS,
        )
    else:
        rows = (("batch", b), ("chunk tokens", min(LITGPT_HEAD_CHUNK, s)), ("vocab", v))
        add("one 128-token chunk of litgpt's logits, its log-softmax or its gradient", rows, compute, LOGITS_LOSS)
        if quantized:
            add(
                "the 4-bit lm_head dequantised for one chunk (fp16, then bf16)",
                (("vocab", v), ("hidden", h)),
                "fp16",
                LOGITS_LOSS,
            )


def _candidates(cfg: RunConfig, shape: ModelShape, device: str, batch: int, seq: int) -> list[RequestMatch]:
    facts = step_facts(cfg, device=device, shape=shape)
    compute, params = facts.compute_dtype, facts.param_dtype
    b, s, v, h = batch, seq, shape.vocab_size, shape.hidden_size
    heads, kv_width = shape.num_heads, shape.num_kv_heads * shape.head_dim
    tokens = (("batch", b), ("tokens", s))
    out: list[RequestMatch] = []

    def add(what: str, dims: tuple[tuple[str, int], ...], dtype: str, location: str) -> None:
        numel = 1
        for _, value in dims:
            numel *= value
        out.append(RequestMatch(what, dims, dtype, numel * ITEMSIZE[dtype], location))

    chunk = facts.loss_chunk
    if facts.litgpt:
        _litgpt_loss_candidates(add, compute, facts.full_ft, facts.quantization != "none", b, s, v, h)
    elif chunk and chunk < b * s:
        rows = (("chunk tokens", chunk), ("vocab", v))
        add("one loss chunk's scores, softmax or gradient (train.loss_chunk_tokens)", rows, "fp32", LOGITS_LOSS)
        if compute != "fp32":
            add("one loss chunk's logits (the LM head over train.loss_chunk_tokens tokens)", rows, compute, LOGITS_LOSS)
    else:
        logits = (*tokens, ("vocab", v))
        loss_dtype = "fp32" if facts.loss.upcast else compute
        if loss_dtype == compute:  # no upcast copy: the head's output is what the loss reads
            add("the logits (the LM head's output), their log-softmax or its gradient", logits, compute, LOGITS_LOSS)
        else:
            add("the logits (the LM head's output)", logits, compute, LOGITS_LOSS)
            add(
                "the logits' fp32 copy the loss makes, their log-softmax or its gradient",
                logits,
                loss_dtype,
                LOGITS_LOSS,
            )
        if facts.loss.shifted_copy:
            shifted = (("batch", b), ("tokens - 1", s - 1), ("vocab", v))
            add(
                "the shifted logits the loss copies (logits[..., :-1, :]), or their log-softmax",
                shifted,
                loss_dtype,
                LOGITS_LOSS,
            )
    if facts.attention in ("eager", "sdpa_math"):
        scores = (("batch", b), ("heads", heads), ("tokens", s), ("tokens", s))
        kernel = "eager attention" if facts.attention == "eager" else "SDPA's math kernel"
        add(
            f"attention scores or probabilities ({kernel} makes the whole {s:,} × {s:,} matrix)",
            scores,
            compute,
            ATTENTION,
        )
        if compute != "fp32":
            add(f"attention probabilities in fp32 ({kernel}'s softmax upcast)", scores, "fp32", ATTENTION)
    width = 2 * shape.intermediate_size if shape.fused_gate_up else shape.intermediate_size
    add(
        "an MLP activation (the up/gate projection's output)",
        (*tokens, ("intermediate", shape.intermediate_size)),
        compute,
        MLP,
    )
    if width != shape.intermediate_size:
        add("the fused gate/up projection's output", (*tokens, ("2 × intermediate", width)), compute, MLP)
    add("a hidden state (a layer's input, output or residual)", (*tokens, ("hidden", h)), compute, HIDDEN)
    if kv_width != h:
        add("a key or value projection's output", (*tokens, ("kv width", kv_width)), compute, HIDDEN)
    if shape.fused_qkv:
        fused = heads * shape.head_dim + 2 * kv_width
        add("the fused q/k/v projection's output", (*tokens, ("q+k+v width", fused)), compute, HIDDEN)
    for dtype in dict.fromkeys((params, "fp32")):
        role = (
            "a weight, its gradient or an AdamW state (all fp32)"
            if dtype == params == "fp32"
            else "a weight or its gradient"
            if dtype == params
            else "an fp32 copy: an optimizer state, master weight or gradient"
        )
        add(f"the embedding or LM head matrix: {role}", (("vocab", v), ("hidden", h)), dtype, WEIGHTS)
        add(f"an MLP weight matrix: {role}", (("intermediate", shape.intermediate_size), ("hidden", h)), dtype, WEIGHTS)
    return out


def _as_allocated(nbytes: int, device: str) -> int:
    return cuda_block_bytes(nbytes) if device == "cuda" else nbytes


def _tolerance(requested_bytes: int, device: str, printed: bool) -> float:
    """How far the reported size may be from the candidate's allocation. PyTorch prints a size in
    the largest unit it reaches, with two decimals: half of the last digit of that unit."""
    slack = 0.0
    if printed:
        slack = 0.005 * (GIB if requested_bytes > GIB else MIB if requested_bytes > MIB else 1024)
    return slack if device == "cuda" else max(slack, CPU_ALIGNMENT)


def match_failed_request(
    requested_bytes: int | None,
    cfg: RunConfig,
    *,
    device: str,
    batch_shape: dict | None = None,
    printed: bool = False,
    phase: str | None = None,
    shape: ModelShape | None = None,
) -> list[RequestMatch]:
    """The tensors of this config's step that are the failed request's size, most telling first.

    `device` is "cuda" or "cpu" (how the allocator sized the request); `batch_shape` the failing
    batch (`{"batch_size", "seq_len"}`: a long batch at step 900 is not the config's seq_len);
    `printed` whether the size was read back from a message's "%.2f MiB" text (not exact bytes);
    `phase` where the step failed ("optimizer" puts weight-sized matches first).
    Empty when nothing matches, the request is too small to name, or the model is not one the
    estimator reads."""
    if not requested_bytes or requested_bytes < SMALLEST_NAMED:
        return []
    device = "cuda" if device.startswith("cuda") else "cpu"
    batch = (batch_shape or {}).get("batch_size") or cfg.train.micro_batch_size
    seq = (batch_shape or {}).get("seq_len") or cfg.data.seq_len
    try:
        candidates = _candidates(cfg, shape or shape_for(cfg.model.name), device, batch, seq)
    except (ArchitectureError, OSError):  # not a model the estimator reads, or its config.json is gone
        return []
    tolerance = _tolerance(requested_bytes, device, printed)
    found = [
        c
        for c in candidates
        if c.nbytes >= _SMALLEST_TENSOR[device] and abs(_as_allocated(c.nbytes, device) - requested_bytes) <= tolerance
    ]
    if phase == "optimizer":  # the update makes no activations: a weight-sized copy comes first
        found.sort(key=lambda match: match.location != WEIGHTS)
    return found


def request_sentence(requested_bytes: int | None, matches: list[RequestMatch]) -> str | None:
    """One sentence for a post-mortem: what the failed request was, with the arithmetic."""
    if not matches:
        return None
    first, others = matches[0], matches[1:3]
    text = f"The failed {human_bytes(requested_bytes)} request is {first.formula}: {first.what}"
    if others:
        text += "; or " + "; or ".join(f"{m.formula}: {m.what}" for m in others)
    return text + "."


def postmortem_request(postmortem: Mapping[str, Any], cfg: RunConfig | None) -> list[RequestMatch]:
    """`match_failed_request` for a post-mortem the runner recorded (a dict of its columns). On
    CUDA the OOM observer gives the block's exact size; without it the size was read back from
    the message's text."""
    if cfg is None:
        return []
    device = str(postmortem.get("device") or cfg.train.device)
    exact = not device.startswith("cuda") or postmortem.get("allocator_stats") is not None
    return match_failed_request(
        postmortem.get("requested_bytes"),
        cfg,
        device=device,
        batch_shape=postmortem.get("batch_shape"),
        printed=not exact,
        phase=postmortem.get("phase"),
    )
