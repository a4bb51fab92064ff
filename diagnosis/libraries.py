"""Library versions that change a step's memory, and which version an estimate assumes.

Most memory rules hold across versions; the ones that do not are kept here, each with the
version that changed it, so an estimate can follow the versions that actually ran (a post-mortem's
recorded environment, a published measurement's stated versions) instead of whatever this machine
has installed.
"""

from __future__ import annotations

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

# Models that computed their loss on the logits as the LM head made them (16-bit under bf16
# weights: a shifted contiguous copy, log-softmax and its gradients all 16-bit) until they moved to
# the shared ForCausalLMLoss, which upcasts to fp32; the first release that upcasts, read in the
# 4.45.2, 4.46.0, 4.46.3, 4.47.0, 4.48.0 and 4.49.0 wheels' modeling files. Llama, Mistral, Qwen2,
# Gemma, Phi and the rest upcast in every release since 4.45 (`logits = logits.float()` in forward).
LOSS_UPCAST_SINCE = {
    "gpt2": (4, 49, 0),
    "gpt_bigcode": (4, 49, 0),
    "gpt_neox": (4, 49, 0),
    "opt": (4, 49, 0),
    "bloom": (4, 49, 0),
    "falcon": (4, 49, 0),
    "stablelm": (4, 46, 0),
}
SRC_TRANSFORMERS_LOSS_DTYPE = (
    "transformers modeling_<model>.py before the shared loss_function (4.49.0; StableLM 4.46.0): "
    "shift_logits = lm_logits[..., :-1, :].contiguous(); CrossEntropyLoss() on it, no .float()"
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


def installed_version(package: str) -> str | None:
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


def loss_upcasts_logits(model_type: str, transformers: str | None) -> bool:
    """Whether this transformers computes `model_type`'s loss on fp32 logits; an unknown version is
    taken as current, where every model does."""
    since = LOSS_UPCAST_SINCE.get(model_type)
    parsed = parse_version(transformers)
    return since is None or parsed is None or parsed >= since


def version_that_runs(package: str, named: str | None) -> str | None:
    """The version of `package` an estimate follows: the one named, else the one installed here, else None."""
    return named or installed_version(package)


@dataclass(frozen=True)
class Libraries:
    """The versions that run a step, as the estimators follow them: None where none is known, which
    every rule reads as current behaviour."""

    bitsandbytes: str | None = None
    transformers: str | None = None

    @classmethod
    def that_run(cls, *, bitsandbytes: str | None = None, transformers: str | None = None) -> Libraries:
        """The versions named, else those installed here."""
        return cls(version_that_runs("bitsandbytes", bitsandbytes), version_that_runs("transformers", transformers))

    @property
    def bnb_keeps_matmul_input(self) -> bool:
        return bitsandbytes_keeps_matmul_input(self.bitsandbytes)

    @property
    def checkpoints_reentrantly(self) -> bool:
        return checkpoints_reentrantly(self.transformers)

    def loss_upcasts_logits(self, model_type: str) -> bool:
        return loss_upcasts_logits(model_type, self.transformers)
