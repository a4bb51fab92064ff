"""Library versions that change a step's memory, and which version an estimate assumes.

Most memory rules hold across versions; the ones that do not are kept here, each with the
version that changed it, so an estimate can follow the versions that actually ran (a post-mortem's
recorded environment, a published measurement's stated versions) instead of whatever this machine
has installed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import metadata

# bitsandbytes before 0.43.2 kept the input A of every 4-bit matmul on its autograd ctx
# (`ctx.tensors = (A, B)`) although frozen 4-bit weights never get a gradient that needs it;
# bitsandbytes#1270 (merged 2024-07-16, released in 0.43.2) keeps `(None, B)`.
BNB_MATMUL4BIT_DROPS_INPUT = (0, 43, 2)
SRC_BNB_1270 = (
    "bitsandbytes#1270 'delete useless buffered activation' (in 0.43.2): MatMul4Bit.forward kept "
    "ctx.tensors = (A, B) whenever an input needed a gradient, so every 4-bit linear's input lived until "
    "its backward; from 0.43.2 it keeps (None, B)"
)


# transformers' gradient_checkpointing_enable() without kwargs checkpoints reentrantly before 5.0
# (read in the 4.57.6 and 5.0.0 wheels' modeling_utils.py).
TRANSFORMERS_NON_REENTRANT_SINCE = (5, 0, 0)
SRC_TRANSFORMERS_REENTRANT = (
    "transformers#28538 made gradient_checkpointing_enable() pass use_reentrant=True when given no kwargs; "
    "transformers#43203 switched it to False, first released in 5.0.0 (4.57.6 still True)"
)

# How a causal LM's loss treats the logits, by transformers release; read in the 4.45.2, 4.46.0,
# 4.46.3, 4.47.0, 4.48.0 and 4.49.0 wheels (each <Model>ForCausalLM.forward and loss_utils.py).
# - From 4.49 every model calls the shared ForCausalLMLoss, which upcasts the logits to fp32 and
#   pads the labels instead of copying the logits shifted.
# - Before 4.49 the shared loss (where a model used it) made `logits[..., :-1, :].contiguous()` of
#   the fp32 logits, beside the caller's 16-bit ones.
# - Before a model moved to the shared loss, its own forward made the same shifted copy. The
#   upcasting families ran `logits = logits.float()` there, which frees the 16-bit head output; the
#   others (GPT-2 and kin) ran cross-entropy on the 16-bit copy.
SHARED_LOSS_PADS_LABELS = (4, 49, 0)
# model_type → (first release whose forward calls the shared loss, whether its own loss upcast)
LOSS_HISTORY: dict[str, tuple[tuple[int, ...], bool]] = {
    "llama": ((4, 46, 0), True),
    "qwen2": ((4, 46, 0), True),
    "gemma": ((4, 46, 0), True),
    "gemma2": ((4, 46, 0), True),
    "phi": ((4, 46, 0), True),
    "phi3": ((4, 46, 0), True),
    "mixtral": ((4, 46, 0), True),
    "starcoder2": ((4, 47, 0), True),
    "mistral": ((4, 48, 0), True),
    "gpt2": ((4, 49, 0), False),
    "gpt_bigcode": ((4, 49, 0), False),
    "gpt_neox": ((4, 49, 0), False),
    "opt": ((4, 49, 0), False),
    "bloom": ((4, 49, 0), False),
    "falcon": ((4, 49, 0), False),
    "stablelm": ((4, 49, 0), False),
}
SRC_TRANSFORMERS_OLD_LOSS = (
    "transformers before 4.49: shift_logits = logits[..., :-1, :].contiguous() in the shared ForCausalLMLoss "
    "(after logits.float()) or in the model's own forward (GPT-2, GPTBigCode, GPT-NeoX, OPT, BLOOM, Falcon, "
    "StableLM: no .float(); Llama-family forwards: logits = logits.float() first)"
)


@dataclass(frozen=True)
class LossLayout:
    """What the loss keeps beside the log-softmax, by the transformers that computes it."""

    upcast: bool = True  # cross-entropy on fp32 logits (else in the logits' own dtype)
    shifted_copy: bool = False  # logits[..., :-1, :].contiguous() in the loss's dtype
    keeps_head_output: bool = True  # the 16-bit lm_head output stays alive beside the upcast

    @property
    def is_current(self) -> bool:
        return self == LossLayout()


# Every family read in 4.45.2 turns use_cache off when gradient checkpointing trains, except
# GPTBigCode until 4.53 (read in the 4.45.2 to 4.53.0 wheels): its config defaults use_cache to True,
# so each layer's `present = key_value`, a view of that layer's c_attn output, stays alive until the
# forward returns, through the loss.
GPT_BIGCODE_CACHE_OFF_UNDER_CHECKPOINTING = (4, 53, 0)
SRC_GPT_BIGCODE_CACHE = (
    "transformers modeling_gpt_bigcode.py before 4.53.0: presents.append(outputs[1]) with use_cache from "
    "config.use_cache (True) under gradient checkpointing; 4.53.0 sets use_cache = False there"
)

# GPTBigCode lost gradient checkpointing in the 4.54 refactor (transformers#38635: its blocks became
# plain nn.Module and the model stopped calling a checkpoint function) until transformers#41818 made
# them GradientCheckpointingLayer again, released in 5.0 (read in the 4.53.0, 4.54.0, 4.55.0,
# 4.56.0, 4.57.6 and 5.0.0 wheels; every other family read in 4.57.6 checkpoints).
GPT_BIGCODE_CHECKPOINTING_LOST = ((4, 54, 0), (5, 0, 0))
SRC_GPT_BIGCODE_NO_CHECKPOINTING = (
    "transformers#38635 (4.54) dropped GPTBigCode's gradient checkpointing: gradient_checkpointing_enable() "
    "succeeds and nothing is recomputed; transformers#41818 restored it in 5.0"
)

# From 4.54 transformers hands SDPA grouped-query attention as it is (`enable_gqa=True`, no
# repeat_kv) when there is no attention mask, on torch >= 2.5. On CUDA only the flash kernel takes
# enable_gqa, and it takes 16-bit inputs only: fp32 q/k/v go to the math kernel, which keeps the
# b·a·s² probabilities like eager attention. Measured on an H100 (torch 2.11, tests/fixtures/gpu/):
# tiny-llama's fp32 sdpa step peaked at exactly its eager step's bytes.
TRANSFORMERS_SDPA_ENABLE_GQA = (4, 54, 0)
TORCH_SDPA_ENABLE_GQA = (2, 5)
SRC_SDPA_GQA_MATH = (
    "transformers integrations/sdpa_attention.py use_gqa_in_sdpa (4.54+); torch sdp_utils.cpp: "
    "memory-efficient attention refuses enable_gqa, flash takes fp16/bf16 only; measured on an H100, torch 2.11"
)

# A version that names today's release, for a reader that must not fall back on this machine's.
LATEST = "latest"


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """The release numbers of a version or a requirement (`0.43.3`, `>=0.43.0`, `0.42.0.dev1`);
    None when there are none. A requirement gives its lower bound, the version a reader can rely on."""
    if not text:
        return None
    found = re.search(r"\d+(?:\.\d+)*", str(text))
    return tuple(int(part) for part in found.group(0).split(".")) if found else None


@functools.cache
def installed_version(package: str) -> str | None:
    """Asked on every estimate (the suggestion engine makes dozens): reading package metadata costs
    about a millisecond, and what is installed does not change under a running process."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def bitsandbytes_keeps_matmul_input(version: str | None) -> bool:
    """Whether this bitsandbytes keeps a 4-bit matmul's input for backward; an unknown version is
    taken as current (what `pip install bitsandbytes` gives today), which keeps none."""
    parsed = parse_version(version)
    return parsed is not None and parsed < BNB_MATMUL4BIT_DROPS_INPUT


def checkpoints_reentrantly(transformers: str | None) -> bool:
    """Whether this transformers' default gradient checkpointing is the reentrant kind."""
    parsed = parse_version(transformers)
    return parsed is not None and parsed < TRANSFORMERS_NON_REENTRANT_SINCE


def loss_layout(model_type: str, transformers: str | None) -> LossLayout:
    """How this transformers computes `model_type`'s loss; an unknown version is taken as current.
    An unknown model before 4.49 is given the shared loss's layout, the larger of the old ones."""
    parsed = parse_version(transformers)
    if parsed is None or parsed >= SHARED_LOSS_PADS_LABELS:
        return LossLayout()
    shared_since, own_upcast = LOSS_HISTORY.get(model_type, ((0,), True))
    if parsed >= shared_since:
        return LossLayout(upcast=True, shifted_copy=True, keeps_head_output=True)
    return LossLayout(upcast=own_upcast, shifted_copy=True, keeps_head_output=not own_upcast)


def keeps_training_cache(model_type: str, transformers: str | None, checkpointing: bool) -> bool:
    """Whether this transformers keeps every layer's key/value cache through a checkpointed training forward."""
    parsed = parse_version(transformers)
    return (
        model_type == "gpt_bigcode"
        and checkpointing
        and parsed is not None
        and parsed < GPT_BIGCODE_CACHE_OFF_UNDER_CHECKPOINTING
    )


def ignores_checkpointing(model_type: str, transformers: str | None) -> bool:
    """Whether this transformers silently runs `model_type` without gradient checkpointing when asked for it."""
    parsed = parse_version(transformers)
    lost, restored = GPT_BIGCODE_CHECKPOINTING_LOST
    return model_type == "gpt_bigcode" and parsed is not None and lost <= parsed < restored


def sdpa_gqa_takes_math_kernel(transformers: str | None, torch: str | None) -> bool:
    """Whether fp32 SDPA with grouped-query attention runs CUDA's math kernel under these versions
    (see TRANSFORMERS_SDPA_ENABLE_GQA); unknown versions are taken as current, which does."""
    hf, pt = parse_version(transformers), parse_version(torch)
    return (hf is None or hf >= TRANSFORMERS_SDPA_ENABLE_GQA) and (pt is None or pt >= TORCH_SDPA_ENABLE_GQA)


def release(parts: tuple[int, ...]) -> str:
    """A version tuple as users type it (`0.43.2`), for the messages that name one."""
    return ".".join(str(part) for part in parts)


# One wording for the estimate's note, the trace's note and the suggestion ("lost in 4.54, …").
CHECKPOINTING_LOST_AND_RESTORED = (
    f"lost in {release(GPT_BIGCODE_CHECKPOINTING_LOST[0]).removesuffix('.0')}, transformers#38635; "
    f"back in {release(GPT_BIGCODE_CHECKPOINTING_LOST[1]).removesuffix('.0')}, #41818"
)


def version_that_runs(package: str, named: str | None) -> str | None:
    """The version of `package` an estimate follows: the one named, else the one installed here, else None."""
    return named or installed_version(package)


@dataclass(frozen=True)
class Libraries:
    """The versions that run a step, as the estimators follow them: None where none is known, which
    every rule reads as current behaviour."""

    bitsandbytes: str | None = None
    transformers: str | None = None
    torch: str | None = None

    @classmethod
    def that_run(
        cls, *, bitsandbytes: str | None = None, transformers: str | None = None, torch: str | None = None
    ) -> Libraries:
        """The versions named, else those installed here."""
        return cls(
            version_that_runs("bitsandbytes", bitsandbytes),
            version_that_runs("transformers", transformers),
            version_that_runs("torch", torch),
        )

    @property
    def torch_release(self) -> tuple[int, ...] | None:
        return parse_version(self.torch)

    @property
    def sdpa_gqa_takes_math_kernel(self) -> bool:
        return sdpa_gqa_takes_math_kernel(self.transformers, self.torch)

    @property
    def bnb_keeps_matmul_input(self) -> bool:
        return bitsandbytes_keeps_matmul_input(self.bitsandbytes)

    @property
    def checkpoints_reentrantly(self) -> bool:
        return checkpoints_reentrantly(self.transformers)

    def loss_layout(self, model_type: str) -> LossLayout:
        return loss_layout(model_type, self.transformers)

    def keeps_training_cache(self, model_type: str, checkpointing: bool) -> bool:
        return keeps_training_cache(model_type, self.transformers, checkpointing)

    def ignores_checkpointing(self, model_type: str) -> bool:
        return ignores_checkpointing(model_type, self.transformers)
