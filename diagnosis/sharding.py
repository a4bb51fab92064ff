"""ZeRO and FSDP sharding and offload applied to a step's memory components, for any estimator.

Both estimators compute what one unsharded process holds; this module divides it across
`train.num_gpus` data-parallel ranks the way the sharding library does. DeepSpeed ZeRO (ZeRO paper
§5, Rajbhandari et al. SC'20): stage 1 shards optimizer states, stage 2 also gradients, stage 3 also
parameters; offload moves optimizer states (and, at stage 3, parameters) to host memory; its
bf16/fp16 optimizers keep fp32 master weights. PyTorch FSDP shards the same way but runs the
ordinary torch optimizer on the shards, so states stay in the parameters' dtype and there is no
master copy: the two differ by up to 12 bytes per parameter, hence two config sections.

Pure arithmetic, no imports of torch or DeepSpeed, so the traced estimator can apply the same
division to its exact bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from diagnosis.architecture import ModelShape
from diagnosis.estimate import Term
from trainer.config import RunConfig

SRC_ZERO = "Rajbhandari et al., ZeRO (SC'20) §5: Pos 4Ψ + 12Ψ/N, Pos+g 2Ψ + 14Ψ/N, Pos+g+p 16Ψ/N"
SRC_FUSED_ADAM = "DeepSpeed builds FusedAdam for an AdamW config (deepspeed.ops.adam.FusedAdam, multi-tensor in place)"
SRC_DEEPSPEED_CONFIG = (
    "DeepSpeed zero_optimization defaults: reduce_bucket_size 5e8, stage3_prefetch_bucket_size 5e7, "
    "stage3_max_live_parameters 1e9 (deepspeed/runtime/zero/config.py)"
)
SRC_FSDP = (
    "torch.distributed.fsdp.FullyShardedDataParallel: FULL_SHARD shards parameters, gradients and optimizer "
    "states; SHARD_GRAD_OP keeps parameters unsharded between forward and backward; the optimizer steps the "
    "sharded parameters in their own dtype (no master copy)"
)
SRC_FSDP_UNITS = (
    "FSDP docs: limit_all_gathers keeps GPU memory to two consecutive FSDP instances (the one computing and the "
    "one whose all-gather is prefetched); fsdp/_runtime_utils.py _post_forward_reshard does not free the root's "
    "parameters after forward (FSDP2 fully_shard: reshard_after_forward False for the root); _post_backward_hook "
    "holds the unit's unsharded gradient until its reduce-scatter"
)
SRC_FSDP_PEFT = (
    "peft.utils.other.fsdp_auto_wrap_policy wraps each trainable LoRA module as its own FSDP unit, so frozen "
    "units get no gradient (FSDP docs: mixing frozen and trainable parameters in one unit costs gradients as if "
    "nothing were frozen)"
)
REDUCE_BUCKET_ELEMENTS = 500_000_000
PREFETCH_BUCKET_ELEMENTS = 50_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def _ceil_div(value: int, ranks: int) -> int:
    return -(-value // ranks)


def zero_stage(cfg: RunConfig) -> int:
    return cfg.deepspeed.zero_stage if cfg.deepspeed else 0


def fsdp_strategy(cfg: RunConfig) -> str | None:
    """The FSDP sharding strategy, or None without FSDP (NO_SHARD counts as none: it is DDP). On one
    GPU FSDP itself switches to NO_SHARD (fsdp/_init_utils.py warns "the world size is 1")."""
    if cfg.fsdp is None or cfg.fsdp.sharding_strategy == "no_shard" or cfg.train.num_gpus == 1:
        return None
    return cfg.fsdp.sharding_strategy


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
    temporaries, done per shard); other keys pass through unchanged. Without ZeRO (stage 0) or FSDP
    sharding every rank holds everything, whatever `num_gpus`.
    """
    if fsdp_strategy(cfg):
        return _fsdp_components(components, cfg)
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


def _fsdp_components(components: Mapping[str, int], cfg: RunConfig) -> tuple[dict[str, int], list[Term]]:
    """FSDP's persistent per-rank bytes: every sharded tensor ÷ ranks, or on the host under offload.
    The units it gathers to compute are transient (`gathered_parameter_bytes`)."""
    assert cfg.fsdp is not None
    out = dict(components)
    ranks, offload = cfg.train.num_gpus, cfg.fsdp.offload_params
    where = "offloaded to cpu" if offload else f"÷ {ranks} ranks"
    strategy = cfg.fsdp.sharding_strategy.upper()
    terms = []
    for key, label in (
        ("parameters", "parameters (sharded copy)"),
        ("gradients", "gradients"),
        ("optimizer_states", "optimizer states, in the parameters' dtype"),
        ("optimizer_transient", "optimizer temporaries"),
    ):
        if key not in out:
            continue
        out[key] = 0 if offload else _ceil_div(out[key], ranks)
        terms.append(Term(f"{label}, FSDP {strategy} ({where})", out[key], f"{components[key]:,} B {where}", SRC_FSDP))
    return out, terms


@dataclass(frozen=True)
class Gathered:
    """Full-size parameters (and, in backward, gradients) a sharded rank holds while it computes,
    on top of its shards: one number per phase, because FSDP holds more in backward."""

    forward: int = 0
    backward: int = 0
    # FSDP's root unit keeps the lm_head gradient unsharded until backward ends; counted here.
    holds_head_gradient: bool = False
    name: str = ""
    formula: str = ""
    source: str = ""

    def __bool__(self) -> bool:
        return bool(self.forward or self.backward)

    def term(self) -> Term:
        return Term(self.name, max(self.forward, self.backward), self.formula, self.source)


def gathered_parameter_bytes(shape: ModelShape, cfg: RunConfig) -> Gathered:
    """What ZeRO-3 or FSDP gathers to full size while a module computes (nothing otherwise)."""
    if fsdp_strategy(cfg):
        return _fsdp_gathered(shape, cfg)
    live = zero3_gathered_bytes(shape, cfg)
    if not live:
        return Gathered()
    return Gathered(
        live, live, False, "ZeRO-3 gathered parameters", "largest module + prefetch bucket", SRC_DEEPSPEED_CONFIG
    )


def _fsdp_gathered(shape: ModelShape, cfg: RunConfig) -> Gathered:
    """FSDP with one unit per decoder layer (transformers' TRANSFORMER_BASED_WRAP, as accelerate and
    the HF Trainer set it). The root unit (embeddings, final norm, head) stays gathered from forward
    through backward; FULL_SHARD holds at most two layer units besides (the one computing and the
    prefetched one); SHARD_GRAD_OP keeps every unit gathered until its backward. In backward a
    full fine-tune also holds the computing unit's unsharded gradient, and the root's (the lm_head
    gradient waits for the embedding's, the last one made)."""
    assert cfg.fsdp is not None
    from diagnosis.analytic import nf4_bytes_per_param  # here: diagnosis.analytic imports this module

    compute = _ITEMSIZE[cfg.model.dtype] if cfg.train.mixed_precision == "no" else 2
    linear = shape.attention_parameters() + shape.mlp_parameters()
    nf4 = nf4_bytes_per_param(cfg.model.double_quantization)
    per_weight = {"nf4": nf4, "int8": 1.0}.get(cfg.model.quantization, compute)
    unit = round(linear * per_weight) + shape.layer_norm_parameters() * compute
    root_parameters = shape.embedding_parameters() + shape.final_norm_parameters() + shape.lm_head_parameters()
    root = root_parameters * compute
    if cfg.fsdp.sharding_strategy == "full_shard":
        units, held = 2 * unit, f"root {root:,} B + 2 units × {unit:,} B"
    else:
        units, held = shape.num_layers * unit, f"root {root:,} B + {shape.num_layers} units × {unit:,} B"
    forward = root + units
    gradients = 0
    if cfg.lora is None:
        gradients = (shape.layer_parameters() + root_parameters) * _grad_itemsize(cfg)
        held += f" + unit and root gradients {gradients:,} B"
    source = SRC_FSDP_UNITS if cfg.lora is None else f"{SRC_FSDP_UNITS}; {SRC_FSDP_PEFT}"
    name = f"FSDP {cfg.fsdp.sharding_strategy.upper()} gathered units (root + decoder layers)"
    return Gathered(forward, forward + gradients, bool(gradients), name, held, source)


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
