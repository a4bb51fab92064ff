"""ZeRO sharding and offload applied to a step's memory components, for any estimator.

Both estimators compute what one unsharded process holds; this module divides it the way DeepSpeed
ZeRO does across `train.num_gpus` data-parallel ranks (ZeRO paper §5, Rajbhandari et al. SC'20):
stage 1 shards optimizer states, stage 2 also gradients, stage 3 also parameters; offload moves
optimizer states (and, at stage 3, parameters) to host memory. Pure arithmetic, no imports of
torch or DeepSpeed, so the traced estimator can apply the same division to its exact bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

from diagnosis.architecture import ModelShape
from diagnosis.estimate import Term
from trainer.config import RunConfig

SRC_ZERO = "Rajbhandari et al., ZeRO (SC'20) §5: Pos 4Ψ + 12Ψ/N, Pos+g 2Ψ + 14Ψ/N, Pos+g+p 16Ψ/N"
SRC_FUSED_ADAM = "DeepSpeed builds FusedAdam for an AdamW config (deepspeed.ops.adam.FusedAdam, multi-tensor in place)"
SRC_DEEPSPEED_CONFIG = (
    "DeepSpeed zero_optimization defaults: reduce_bucket_size 5e8, stage3_prefetch_bucket_size 5e7, "
    "stage3_max_live_parameters 1e9 (deepspeed/runtime/zero/config.py)"
)
REDUCE_BUCKET_ELEMENTS = 500_000_000
PREFETCH_BUCKET_ELEMENTS = 50_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def _ceil_div(value: int, ranks: int) -> int:
    return -(-value // ranks)


def zero_stage(cfg: RunConfig) -> int:
    return cfg.deepspeed.zero_stage if cfg.deepspeed else 0


def master_weight_bytes(gradient_bytes: int, cfg: RunConfig) -> int:
    """DeepSpeed's bf16/fp16 optimizers keep an fp32 master copy of 16-bit trainable weights
    (the 12Ψ of the ZeRO paper is master + momentum + variance). peft adapters are fp32 already."""
    if zero_stage(cfg) == 0 or cfg.lora is not None or cfg.model.dtype == "fp32":
        return 0
    return gradient_bytes // _ITEMSIZE[cfg.model.dtype] * 4


# Optimizers whose states take the dtype of the tensors they update (bitsandbytes' do not).
_TORCH_OPTIMIZERS = ("adamw", "adafactor", "sgd")


def shard_components(components: Mapping[str, int], cfg: RunConfig) -> tuple[dict[str, int], list[Term]]:
    """Per-rank device bytes of `components` under the config's ZeRO stage and offload.

    Knows `parameters`, `gradients`, `optimizer_states` and `optimizer_transient` (the update's
    temporaries, done per shard); other keys pass through unchanged. Without ZeRO (stage 0) every
    rank holds everything, whatever `num_gpus`.
    """
    out = dict(components)
    stage, ranks = zero_stage(cfg), cfg.train.num_gpus
    if stage == 0:
        return out, []
    assert cfg.deepspeed is not None
    terms: list[Term] = []
    gradients = out.get("gradients", 0)
    master = master_weight_bytes(gradients, cfg)
    if master:
        # The optimizer then updates the fp32 master: its states are fp32 too.
        states = out.get("optimizer_states", 0) * (2 if cfg.train.optimizer in _TORCH_OPTIMIZERS else 1)
        out["optimizer_states"] = states + master
        terms.append(
            Term(
                "fp32 master weights + fp32 states (DeepSpeed)",
                out["optimizer_states"],
                f"4 B × {master // 4:,} trainable 16-bit parameters + states in fp32",
                SRC_ZERO,
            )
        )
    if out.get("optimizer_transient") and cfg.train.optimizer == "adamw":
        out["optimizer_transient"] = 0
        terms.append(Term("optimizer temporaries under DeepSpeed", 0, "FusedAdam updates in place", SRC_FUSED_ADAM))
    offload_optimizer = cfg.deepspeed.offload_optimizer != "none"
    for key in ("optimizer_states", "optimizer_transient"):
        if key in out:
            out[key] = 0 if offload_optimizer else _ceil_div(out[key], ranks)
    where = f"offloaded to {cfg.deepspeed.offload_optimizer}" if offload_optimizer else f"÷ {ranks} ranks"
    terms.append(Term(f"optimizer states, ZeRO-{stage} ({where})", out.get("optimizer_states", 0), where, SRC_ZERO))
    if stage >= 2:
        trainable = gradients // max(1, _grad_itemsize(cfg))
        bucket = min(REDUCE_BUCKET_ELEMENTS, trainable) * _grad_itemsize(cfg)
        out["gradients"] = _ceil_div(gradients, ranks) + bucket
        terms.append(
            Term(
                f"gradients, ZeRO-{stage} (÷ {ranks} ranks + reduce bucket)",
                out["gradients"],
                f"{gradients} / {ranks} + min(5e8, trainable) × {_grad_itemsize(cfg)} B",
                SRC_DEEPSPEED_CONFIG,
            )
        )
    if stage == 3 and "parameters" in out:
        offload_params = cfg.deepspeed.offload_params != "none"
        out["parameters"] = 0 if offload_params else _ceil_div(out["parameters"], ranks)
        where = f"offloaded to {cfg.deepspeed.offload_params}" if offload_params else f"÷ {ranks} ranks"
        terms.append(Term(f"parameters, ZeRO-3 ({where})", out["parameters"], where, SRC_ZERO))
    return out, terms


def _grad_itemsize(cfg: RunConfig) -> int:
    # peft adapters of a 16-bit or quantised base are fp32, and so are their gradients.
    if cfg.lora is not None and (cfg.model.dtype != "fp32" or cfg.model.quantization != "none"):
        return 4
    return _ITEMSIZE[cfg.model.dtype]


def zero3_gathered_bytes(shape: ModelShape, cfg: RunConfig) -> int:
    """Parameters ZeRO-3 gathers to full size while a module computes: the largest module plus
    the next one prefetched (at most stage3_prefetch_bucket_size elements), in forward and backward."""
    if zero_stage(cfg) != 3:
        return 0
    largest = max(shape.layer_parameters(), shape.embedding_parameters(), shape.lm_head_parameters())
    live = min(MAX_LIVE_PARAMETERS, largest + min(PREFETCH_BUCKET_ELEMENTS, shape.layer_parameters()))
    return live * _ITEMSIZE[cfg.model.dtype]
