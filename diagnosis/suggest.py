"""Ranked fixes for an out-of-memory failure, each with the bytes it saves and the exact change.

Input is whatever the user has: a parsed OOM message, a post-mortem the runner saved, a snapshot
summary, a run config (then every saving is a what-if of the estimator: the config estimated
as is and with the change). Output is best first:

1. fixes that would close the shortfall (bytes missing at the failure), cheapest first: an
   allocator setting costs nothing, checkpointing costs ~30% of step time, offload much more,
   and a shorter sequence changes the task;
2. fixes that help but not enough alone, by bytes saved;
3. diagnostics that are not a config change (a leak, another process, the checkpoint save path);
4. commonly advised fixes that cannot help here, said explicitly with their (small) saving.

Nothing here reads a database or imports torch: the dashboard, the CLI and the runner's
post-mortems call the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from collector.readings import HEAD_MODULES, LOSS_MODULE
from diagnosis.analytic import PREVIOUS_GRAPH_TERM
from diagnosis.estimate import MemoryEstimate
from diagnosis.failed_request import (
    ATTENTION,
    LOGITS_LOSS,
    RequestMatch,
    match_failed_request,
    postmortem_request,
    request_sentence,
)
from diagnosis.libraries import (
    BNB_MATMUL4BIT_DROPS_INPUT,
    CHECKPOINTING_LOST_AND_RESTORED,
    GPT_BIGCODE_CHECKPOINTING_LOST,
    bitsandbytes_keeps_matmul_input,
    ignores_checkpointing,
    release,
    version_that_runs,
)
from diagnosis.oom_text import OomMessage
from diagnosis.units import GIB, MIB, human_bytes
from trainer.config import ConfigError, RunConfig, apply_overrides, validate_config

CATEGORIES = (
    "alloc_conf",
    "gradient_checkpointing",
    "reduce_batch",
    "reduce_seq_len",
    "lora",
    "zero",
    "offload",
    "efficient_attention",
    # Added after the list: the LM head and loss in chunks (train.loss_chunk_tokens).
    "chunked_loss",
    "mixed_precision",
    "quantization",
    "optimizer_8bit",
    "leak",
    "other_process",
    "host_memory",
    "checkpoint_save",
)
# Cheapest first: what a user gives up (speed, fidelity, the task itself) to take the fix.
_COST_ORDER = (
    "alloc_conf",
    "efficient_attention",
    "chunked_loss",
    "mixed_precision",
    "optimizer_8bit",
    "gradient_checkpointing",
    "reduce_batch",
    "lora",
    "quantization",
    "zero",
    "offload",
    "reduce_seq_len",
)
_DIAGNOSTICS = ("leak", "other_process", "checkpoint_save", "host_memory")

Confidence = Literal["high", "medium", "low"]
Estimator = Callable[..., MemoryEstimate]

# A fix saving less than this share of the shortfall "cannot help": it is listed to say so.
CANNOT_HELP_SHARE = 0.05
# Below this share of the peak a component is not worth a fix of its own.
DOMINANT_SHARE = 0.25
_EXPANDABLE_SINCE = (2, 1)


@dataclass(frozen=True)
class Suggestion:
    category: str
    change: str  # what to type: "model.gradient_checkpointing=true" or "PYTORCH_CUDA_ALLOC_CONF=..."
    saves_bytes: int | None
    confidence: Confidence
    why: str
    # Config keys → values that apply the change to a run config (empty when it is not a config change).
    patch: Mapping[str, Any] = field(default_factory=dict)
    # Why saves_bytes is null, when it is.
    saves_reason: str | None = None
    # False: a fix people commonly advise that would not make this fit; listed to say so.
    helps: bool = True
    # Whether the saving alone closes the shortfall (None when the shortfall is unknown).
    sufficient: bool | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "change": self.change,
            "patch": dict(self.patch),
            "saves_bytes": self.saves_bytes,
            "saves_reason": self.saves_reason,
            "confidence": self.confidence,
            "why": self.why,
            "helps": self.helps,
            "sufficient": self.sufficient,
        }


@dataclass(frozen=True)
class Evidence:
    """What is known about one failure or one planned run; every part optional."""

    config: RunConfig | None = None
    message: OomMessage | None = None
    # A post-mortem as plain data (collector.readings.PostMortem / db PostmortemRecord as a dict).
    postmortem: Mapping[str, Any] | None = None
    # diagnosis.snapshot.SnapshotSummary.to_json() of the allocator snapshot, when there is one.
    snapshot: Mapping[str, Any] | None = None
    # The device's usable bytes when the user names a card or a capacity.
    capacity_bytes: int | None = None
    # "2.3.1"; decides expandable_segments vs max_split_size_mb.
    torch_version: str | None = None
    # The bitsandbytes that ran (a recorded run's environment); None: the one installed here.
    bitsandbytes_version: str | None = None
    # The transformers that ran: its checkpointing and some models' loss dtype depend on it.
    transformers_version: str | None = None
    # The card ("NVIDIA H100 80GB HBM3"): its compute capability sets the cuBLAS workspaces.
    gpu_name: str | None = None


def evidence_for_run(
    postmortem: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
    environment: Mapping[str, Any] | None = None,
    capacity_bytes: int | None = None,
) -> Evidence:
    """Evidence for a run the runner recorded: its post-mortem, its config and environment as stored.

    A stored config that no longer validates (its data file was moved, a preset renamed) still
    gives suggestions, only without what-ifs.
    """
    from diagnosis.oom_text import parse_oom

    cfg = None
    if config is not None:
        try:
            cfg = validate_config(dict(config))
        except ConfigError:
            cfg = None
    message = parse_oom((postmortem or {}).get("error_text") or "") if postmortem else None
    packages = (environment or {}).get("versions") or {}
    return Evidence(
        cfg,
        message,
        postmortem,
        None,
        capacity_bytes,
        packages.get("torch"),
        packages.get("bitsandbytes"),
        packages.get("transformers"),
        (environment or {}).get("device_name"),
    )


# --- facts derived from the evidence -------------------------------------------------------------


def _on_cpu(ev: Evidence) -> bool:
    if ev.message is not None:
        return ev.message.backend in ("cpu", "python")
    if ev.postmortem is not None:
        return str(ev.postmortem.get("device", "")).startswith("cpu")
    if ev.config is not None:
        return ev.config.train.device == "cpu"
    return False


def capacity_bytes(ev: Evidence) -> int | None:
    """The budget the step had to fit in: a named card, the message's cap, the device, the limit."""
    if ev.capacity_bytes is not None:
        return ev.capacity_bytes
    if ev.message is not None and (ev.message.allowed_bytes or ev.message.total_bytes):
        return ev.message.allowed_bytes or ev.message.total_bytes
    if ev.config is not None and ev.config.memory.limit_gb is not None:
        return int(ev.config.memory.limit_gb * GIB)
    if ev.postmortem is not None and ev.postmortem.get("device_total_bytes"):
        return int(ev.postmortem["device_total_bytes"])
    return None


def _snapshot_oom(ev: Evidence) -> Mapping[str, Any]:
    """The last OOM event a snapshot recorded ({} when none)."""
    ooms = (ev.snapshot or {}).get("ooms") or []
    return ooms[-1] if ooms else {}


def requested_bytes(ev: Evidence) -> int | None:
    if ev.message is not None and ev.message.requested_bytes is not None:
        return ev.message.requested_bytes
    if ev.postmortem is not None and ev.postmortem.get("requested_bytes") is not None:
        return ev.postmortem["requested_bytes"]
    return _snapshot_oom(ev).get("requested_bytes")


def free_bytes(ev: Evidence) -> int | None:
    if ev.message is not None and ev.message.free_bytes is not None:
        return ev.message.free_bytes
    if ev.postmortem is not None and ev.postmortem.get("device_free_bytes") is not None:
        return ev.postmortem["device_free_bytes"]
    return _snapshot_oom(ev).get("device_free_bytes")


def _expandable_already(ev: Evidence) -> bool:
    settings = (ev.snapshot or {}).get("allocator_settings") or {}
    conf = ev.config.memory.alloc_conf if ev.config is not None else None
    return bool(settings.get("expandable_segments")) or "expandable_segments:true" in (conf or "").lower()


def cached_bytes(ev: Evidence) -> int | None:
    """Reserved by PyTorch but not allocated at the failure: free to reuse only if not split up."""
    if ev.message is not None and ev.message.reserved_unallocated_bytes is not None:
        return ev.message.reserved_unallocated_bytes
    stats = (ev.postmortem or {}).get("allocator_stats") or {}
    reserved, allocated = stats.get("reserved_bytes.all.current"), stats.get("allocated_bytes.all.current")
    if reserved is not None and allocated is not None:
        return max(0, reserved - allocated)
    oom = _snapshot_oom(ev)
    if oom.get("reserved_bytes") is not None and oom.get("allocated_bytes") is not None:
        return max(0, oom["reserved_bytes"] - oom["allocated_bytes"])
    totals = (ev.snapshot or {}).get("totals") or {}
    if totals.get("reserved_bytes") is not None and totals.get("allocated_bytes") is not None:
        return max(0, totals["reserved_bytes"] - totals["allocated_bytes"])
    return None


def _measured(ev: Evidence) -> dict[str, int]:
    """The runner's tensor breakdown at the failure, keyed like the estimate's breakdown."""
    tensors = (ev.postmortem or {}).get("tensors") or {}
    names = {
        "parameters": "parameter_bytes",
        "gradients": "gradient_bytes",
        "optimizer_states": "optimizer_state_bytes",
        "activations": "activation_bytes",
    }
    return {key: int(tensors[name]) for key, name in names.items() if tensors.get(name) is not None}


def _torch_at_least(version: str | None, wanted: tuple[int, int]) -> bool | None:
    if not version:
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return None if match is None else (int(match[1]), int(match[2])) >= wanted


def _frames_text(ev: Evidence) -> str:
    parts = [(ev.postmortem or {}).get("traceback") or ""]
    if ev.message is not None:
        parts.append(ev.message.text)
    return "\n".join(parts)


# --- what-ifs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    ev: Evidence
    estimator: Estimator | None
    device: str
    base: MemoryEstimate | None
    shortfall: int | None
    # The tensors of the config's step that are the failed request's size (diagnosis.failed_request).
    request: list[RequestMatch] = field(default_factory=list)

    def request_is(self, location: str) -> RequestMatch | None:
        """The failed request's tensor, when its best reading lies in `location`."""
        return self.request[0] if self.request and self.request[0].location == location else None

    def request_text(self, location: str) -> str:
        match = self.request_is(location)
        return "" if match is None else " " + request_sentence(requested_bytes(self.ev), [match])

    def what_if(self, patch: Mapping[str, Any]) -> int | None:
        """Peak bytes the change saves, by the estimator; None when the patched config is invalid."""
        if self.base is None or self.ev.config is None or self.estimator is None:
            return None
        patched = patch_config(self.ev.config, patch)
        if patched is None:
            return None
        return self.base.device_bytes - _estimate(self.ev, self.estimator, patched, self.device).device_bytes


def _estimate(ev: Evidence, estimator: Estimator, cfg: RunConfig, device: str, **versions: str) -> MemoryEstimate:
    """`cfg` estimated with the library versions and the card that ran, where the evidence names them."""
    if ev.bitsandbytes_version and "bitsandbytes" not in versions:
        versions["bitsandbytes"] = ev.bitsandbytes_version
    if ev.transformers_version and "transformers" not in versions:
        versions["transformers"] = ev.transformers_version
    if ev.torch_version and "torch" not in versions:
        versions["torch"] = ev.torch_version
    if ev.gpu_name and "gpu" not in versions:
        versions["gpu"] = ev.gpu_name
    return estimator(cfg, device=device, **versions)


def patch_config(cfg: RunConfig, patch: Mapping[str, Any]) -> RunConfig | None:
    """`cfg` with dotted keys set, or None when the result is not a valid config."""
    overrides = [f"{key}={_yaml_value(value)}" for key, value in patch.items()]
    try:
        return validate_config(apply_overrides(cfg.to_dict(), overrides))
    except ConfigError:
        return None


def _yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _change_text(patch: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={_yaml_value(value)}" for key, value in patch.items())


def _shortfall(ev: Evidence, base: MemoryEstimate | None) -> int | None:
    """Bytes missing: what the failed request lacked, or how far the estimated peak overshoots."""
    candidates = []
    requested, free = requested_bytes(ev), free_bytes(ev)
    if requested is not None and free is not None:
        candidates.append(requested - free)
    capacity = capacity_bytes(ev)
    if base is not None and capacity is not None:
        candidates.append(base.device_bytes - capacity)
    if requested is not None and free is None and not candidates:
        candidates.append(requested)
    positive = [c for c in candidates if c > 0]
    return max(positive) if positive else (None if not candidates else 0)


# --- rules ----------------------------------------------------------------------------------------


def _rule_alloc_conf(ctx: _Context) -> list[Suggestion]:
    ev = ctx.ev
    if _on_cpu(ev) or _expandable_already(ev):
        return []
    cached, requested = cached_bytes(ev), requested_bytes(ev)
    varying = ev.config is not None and ev.config.data.vary_length
    if cached is None and not varying:
        return []
    already = ev.config.memory.alloc_conf if ev.config is not None else None
    new_torch = _torch_at_least(ev.torch_version, _EXPANDABLE_SINCE)
    if new_torch is None and ev.message is not None:
        new_torch = not ev.message.era.startswith("cuda<=")
    if new_torch is False:
        split_mb = 128 if requested is None or requested > 128 * MIB else 64
        value = f"max_split_size_mb:{split_mb}"
        setting = f"max_split_size_mb:{split_mb} (expandable_segments needs torch >= 2.1)"
    else:
        value, setting = "expandable_segments:True", "expandable_segments:True"
    if already and value.split(":")[0] in already:
        return []
    patch = {"memory.alloc_conf": value}
    change = f"PYTORCH_CUDA_ALLOC_CONF={value} (config: memory.alloc_conf={value})"
    if cached is None:
        why = (
            "Variable sequence lengths leave differently sized free slivers in the allocator's segments; "
            f"{setting} lets segments grow in place instead. No allocator reading says how much it frees here."
        )
        return [Suggestion("alloc_conf", change, None, "low", why, patch, "no allocator reading at the failure")]
    share = cached / requested if requested else None
    if requested and cached >= requested:
        why = (
            f"{human_bytes(cached)} was reserved by PyTorch but unallocated, more than the {human_bytes(requested)} "
            "request: the free memory was there but split into pieces too small. "
            f"{setting} stops the splitting."
        )
        return [Suggestion("alloc_conf", change, cached, "high", why, patch)]
    if share is not None and share >= 0.3:
        why = (
            f"{human_bytes(cached)} was cached but unusable, {share:.0%} of the {human_bytes(requested)} request; "
            f"{setting} would have let the allocator serve part of it."
        )
        return [Suggestion("alloc_conf", change, cached, "medium", why, patch)]
    why = (
        f"Only {human_bytes(cached)} was reserved but unallocated"
        + (f" against a {human_bytes(requested)} request" if requested else "")
        + ": fragmentation is not the problem, and an allocator setting cannot make this fit."
    )
    return [Suggestion("alloc_conf", change, cached, "low", why, patch, helps=False)]


SAVED_SO_FAR = "saved so far by the forward that failed"
# Made by the first backward and optimizer step: a step-1 failure before them measured none.
NOT_YET_IN_STEP_ONE = ("optimizer_states", "gradients")


def _component(ctx: _Context, key: str) -> tuple[int | None, str]:
    """A component's bytes, measured at the failure if the runner saw it, else estimated."""
    measured = _measured(ctx.ev)
    postmortem = ctx.ev.postmortem or {}
    if key in NOT_YET_IN_STEP_ONE and not measured.get(key) and postmortem.get("step") == 1 and ctx.base is not None:
        # The first step failed before its optimizer step: there were no states or gradients yet to
        # measure, and "0 B" would read as "none needed".
        return _estimated(ctx, key), "estimated: not created yet when step 1 failed"
    if key in measured:
        if key == "activations" and postmortem.get("phase") == "forward":
            # A forward that failed part-way had saved only some of its activations.
            return measured[key], SAVED_SO_FAR
        return measured[key], "measured at the failure"
    return _estimated(ctx, key), "estimated" if ctx.base is not None else ""


def _estimated(ctx: _Context, key: str) -> int | None:
    if ctx.base is None:
        return None
    return ctx.base.totals.get(key, ctx.base.breakdown.get(key))


def _share_of_peak(ctx: _Context, saves: int | None) -> float:
    if not saves or ctx.base is None or ctx.base.peak_allocated_bytes <= 0:
        return 0.0
    return saves / ctx.base.peak_allocated_bytes


def _peak_text(ctx: _Context) -> str:
    if ctx.base is None:
        return ""
    return f" of the {human_bytes(ctx.base.peak_allocated_bytes)} estimated peak"


def _rule_efficient_attention(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    if cfg is None or cfg.model.attn_implementation != "eager":
        return []
    saves = ctx.what_if({"model.attn_implementation": "sdpa"})
    seq = cfg.data.seq_len
    why = (
        f"Eager attention stores the full {seq:,}×{seq:,} score and probability matrices per head and layer; "
        "sdpa (built into torch) and flash_attention_2 never materialise them"
        + (f": saves {human_bytes(saves)}." if saves else ".")
        + ctx.request_text(ATTENTION)
    )
    big = _share_of_peak(ctx, saves) > 0.1 or ctx.request_is(ATTENTION) is not None
    confidence: Confidence = "high" if big else "medium"
    return [
        Suggestion(
            "efficient_attention",
            "model.attn_implementation=sdpa",
            saves,
            confidence,
            why,
            {"model.attn_implementation": "sdpa"},
            None if saves is not None else "no config to estimate",
        )
    ]


def loss_chunk_for(tokens: int) -> int:
    """The chunk `suggest` proposes: 1,024 tokens (a c·V matmul still large enough to run at full
    speed), a quarter of a smaller micro-batch, never under 64."""
    quarter = max(tokens // 4, 1)
    return min(1024, max(64, 1 << (quarter.bit_length() - 1)))


def _failed_in_the_loss(ev: Evidence) -> bool:
    """A traceback that ends in the LM head or the loss (a pasted log, or where the runner placed it)."""
    if ev.message is not None and ev.message.location == LOGITS_LOSS:
        return True
    return ev.postmortem is not None and ev.postmortem.get("module") in (LOSS_MODULE, *HEAD_MODULES)


def failed_request_matches(ev: Evidence) -> list[RequestMatch]:
    """What the failed request was, read against the config: a recorded post-mortem's exact size,
    or a pasted message's (CUDA prints it to two decimals; the CPU allocator gives bytes)."""
    if ev.config is None:
        return []
    if ev.postmortem is not None:
        return postmortem_request(ev.postmortem, ev.config)
    if ev.message is None:
        return []
    backend = ev.message.backend
    # ROCm builds share CUDA's caching allocator (and its block sizes); XPU and MPS allocators round
    # their own way, so their sizes are matched as printed, without CUDA's blocks.
    allocator = "cuda" if backend in ("cuda", "hip") else "cpu"
    printed = backend not in ("cpu", "python")
    return match_failed_request(requested_bytes(ev), ev.config, device=allocator, printed=printed)


def failed_request_text(ev: Evidence) -> str | None:
    """`failed_request_matches` as the sentence screens show ("The failed 4.6 GiB request is …")."""
    return request_sentence(requested_bytes(ev), failed_request_matches(ev))


def _chunked_loss_unestimated(ev: Evidence) -> list[Suggestion]:
    """A pasted log whose traceback ends in the LM head or the loss, with no config to size it."""
    if not _failed_in_the_loss(ev):
        return []
    if ev.message is not None and ev.message.frame:
        frame = f" ({ev.message.frame})"
    else:
        frame = f" (placed in `{ev.postmortem['module']}`)" if ev.postmortem and ev.postmortem.get("module") else ""
    why = (
        f"It failed in the loss over the logits{frame}: the whole micro-batch's logits, their fp32 copy and "
        "log-softmax exist at once there. Computing the LM head and cross-entropy 1,024 tokens at a time gives "
        "the same loss without them (oomlens' runner: train.loss_chunk_tokens; HF Trainer and TRL: "
        "use_liger_kernel=True, Liger-Kernel's fused linear cross-entropy)."
    )
    patch = {"train.loss_chunk_tokens": 1024}
    return [
        Suggestion("chunked_loss", _change_text(patch), None, "medium", why, patch, "no config to estimate the logits")
    ]


def _rule_chunked_loss(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    if cfg is None:
        return _chunked_loss_unestimated(ctx.ev)
    if cfg.train.loss_chunk_tokens:
        return []
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    chunk = loss_chunk_for(tokens)
    if chunk >= tokens:
        return []
    patch = {"train.loss_chunk_tokens": chunk}
    saves = ctx.what_if(patch)
    if not saves or saves <= 0:
        return []
    logits, source = _component(ctx, "logits_loss")
    why = (
        f"The loss holds logits for all {tokens:,} tokens of the micro-batch at once, with their fp32 copy, "
        "log-softmax and gradients"
        + (f": {human_bytes(logits)} ({source}){_peak_text(ctx)}" if logits else "")
        + f"; computing the LM head and cross-entropy {chunk:,} tokens at a time, gradients made in forward "
        "(as Liger-Kernel's fused linear cross-entropy), gives the same loss and gradients without them"
        f": saves {human_bytes(saves)}." + ctx.request_text(LOGITS_LOSS)
    )
    big = _share_of_peak(ctx, saves) > 0.1 or _failed_in_the_loss(ctx.ev) or ctx.request_is(LOGITS_LOSS) is not None
    confidence: Confidence = "high" if big else "medium"
    return [Suggestion("chunked_loss", _change_text(patch), saves, confidence, why, patch)]


def _rule_checkpointing(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    activations, source = _component(ctx, "activations")
    if cfg is not None and cfg.model.gradient_checkpointing:
        return _checkpointing_lost(ctx, cfg)
    if cfg is None and activations is None:
        return []
    patch = {"model.gradient_checkpointing": True}
    saves = ctx.what_if(patch)
    why = "Gradient checkpointing keeps only each layer's input and recomputes the rest in backward (~30% slower)"
    whole = activations
    if activations is not None:
        why += f"; activations were {human_bytes(activations)} ({source})"
        estimated = _estimated(ctx, "activations")
        if source == SAVED_SO_FAR and estimated is not None and abs(estimated - activations) > 0.01 * estimated:
            # A part of the step's: the saving is measured against the whole step's, estimated.
            whole = estimated
            why += f", {human_bytes(whole)} for the whole step (estimated)"
        why += _peak_text(ctx)
    held = ctx.base.term_bytes(PREVIOUS_GRAPH_TERM) if ctx.base else None
    if held:
        why += (
            "; litgpt's loop also holds the previous micro-batch's quantised-linear inputs "
            f"({human_bytes(held)}), which a checkpointed step does not keep"
        )
    if saves and whole is not None and saves > whole and ctx.device == "cuda":
        # The saving is on the device, where the allocator's reserve grows and shrinks with the tensors.
        why += f": saves {human_bytes(saves)} on the device, the allocator's reserve on those bytes included."
    else:
        why += f": saves {human_bytes(saves)}." if saves else "."
    confidence: Confidence = "high" if _share_of_peak(ctx, saves) > DOMINANT_SHARE else "medium"
    if cfg is not None and cfg.model.implementation == "litgpt" and cfg.train.num_gpus == 1:
        # litgpt's finetune scripts checkpoint only under FSDP (activation_checkpointing_policy={Block}).
        why += (
            " litgpt's finetune scripts turn it on only with FSDP across devices: on one GPU it takes a change to "
            "the script (Fabric's FSDPStrategy with activation_checkpointing_policy, or checkpointing each Block)."
        )
        confidence = "low"
    return [
        Suggestion(
            "gradient_checkpointing",
            _change_text(patch),
            saves,
            confidence,
            why,
            patch,
            None if saves is not None else "no config to estimate",
        )
    ]


def _checkpointing_lost(ctx: _Context, cfg: RunConfig) -> list[Suggestion]:
    """Checkpointing asked for and silently not done: the config says it is on, the step says it is not."""
    from diagnosis.architecture import ArchitectureError, shape_for

    version = version_that_runs("transformers", ctx.ev.transformers_version)
    try:
        model_type = shape_for(cfg.model.name).model_type
    except (ArchitectureError, OSError):
        return []
    if not ignores_checkpointing(model_type, version):
        return []
    restored = release(GPT_BIGCODE_CHECKPOINTING_LOST[1])
    saves = None
    if ctx.base is not None and ctx.estimator is not None:
        after = _estimate(ctx.ev, ctx.estimator, cfg, ctx.device, transformers=restored)
        saves = ctx.base.device_bytes - after.device_bytes
    why = (
        f"transformers {version} does not checkpoint {model_type} ({CHECKPOINTING_LOST_AND_RESTORED}): "
        "model.gradient_checkpointing=true does nothing, every activation is kept"
    )
    why += f"; upgrading saves {human_bytes(saves)}." if saves else "."
    return [
        Suggestion(
            "gradient_checkpointing",
            f"pip install 'transformers>={restored}'",
            saves,
            "high",
            why,
            None,
            None if saves is not None else "no config to estimate",
        )
    ]


def _rule_reduce_batch(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    if cfg is None or cfg.train.micro_batch_size < 2:
        return []
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    largest = _largest_fitting(ctx, "train.micro_batch_size", micro - 1)
    # A divisor of the micro-batch, so more accumulation keeps the effective batch exactly.
    divisors = [d for d in range(1, micro) if micro % d == 0]
    fitting = [d for d in divisors if largest is not None and d <= largest]
    target = fitting[-1] if fitting else max(d for d in divisors if d <= micro // 2)
    factor = micro // target
    patch = {"train.micro_batch_size": target, "train.grad_accum_steps": accum * factor}
    saves = ctx.what_if(patch)
    if fitting:
        why = (
            f"Micro-batch {micro} → {target}, the largest that divides it and whose estimated step fits in "
            f"{human_bytes(capacity_bytes(ctx.ev))}, with {factor}× the accumulation keeps the effective batch "
            f"({micro * accum}) and shrinks activations and logits {factor}×"
        )
    elif factor == 2:
        why = (
            f"Half the micro-batch ({micro} → {target}) with twice the accumulation keeps the effective batch "
            "and halves activations and logits"
        )
    else:
        why = (
            f"Micro-batch {micro} → {target} with {factor}× the accumulation keeps the effective batch "
            f"({micro * accum}) and shrinks activations and logits {factor}×"
        )
    why += f": saves {human_bytes(saves)}." if saves else "."
    return [Suggestion("reduce_batch", _change_text(patch), saves, "high" if saves else "medium", why, patch)]


# A cap found by the fit solver is rounded down to this many tokens (a length people write down).
SEQ_LEN_STEP = 64


def _largest_fitting(ctx: _Context, knob: str, upper: int) -> int | None:
    """The largest `knob` (up to `upper`) whose estimate fits the budget, when the step as
    configured does not: a change that cuts only what has to go, where halving can cut too much
    or too little. None without a budget, an estimator, or a value that fits."""
    from diagnosis.fit import largest_fitting

    cfg, capacity = ctx.ev.config, capacity_bytes(ctx.ev)
    if cfg is None or capacity is None or ctx.estimator is None or not ctx.shortfall or upper < 1:
        return None
    estimator = functools.partial(_estimate, ctx.ev, ctx.estimator, device=ctx.device)
    return largest_fitting(cfg, capacity, knob, estimator, upper=upper).value


def _longest_fitting_seq_len(ctx: _Context) -> int | None:
    cfg = ctx.ev.config
    longest = _largest_fitting(ctx, "data.seq_len", cfg.data.seq_len - 1) if cfg is not None else None
    rounded = longest // SEQ_LEN_STEP * SEQ_LEN_STEP if longest is not None else 0
    return rounded if rounded >= SEQ_LEN_STEP else None


def _rule_reduce_seq_len(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    if cfg is None or cfg.data.seq_len < 256:
        return []
    longest = _longest_fitting_seq_len(ctx)
    target = longest if longest is not None else cfg.data.seq_len // 2
    patch = {"data.seq_len": target}
    if cfg.data.min_seq_len is not None and cfg.data.min_seq_len > target:
        patch["data.min_seq_len"] = target
    saves = ctx.what_if(patch)
    if longest is None:
        why = (
            f"Halving the sequence length ({cfg.data.seq_len:,} → {target:,} tokens) halves activations "
            "and logits (quarters eager attention scores), but changes what the model learns"
        )
    else:
        why = (
            f"{target:,} tokens is the longest sequence whose estimated step fits in "
            f"{human_bytes(capacity_bytes(ctx.ev))} (config: {cfg.data.seq_len:,}); capping data.seq_len there "
            "truncates only longer samples, but changes what the model learns from them"
        )
        if cfg.data.vary_length:
            why += "; with variable-length data, only the batches longer than that are cut"
    why += f": saves {human_bytes(saves)}." if saves else "."
    return [Suggestion("reduce_seq_len", _change_text(patch), saves, "medium", why, patch)]


def _rule_lora(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    if cfg is None:
        return []
    if cfg.lora is None:
        patch = {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": _lora_targets(cfg)}}
        saves = ctx.what_if(patch)
        states, source = _component(ctx, "optimizer_states")
        why = (
            "Full fine-tuning keeps gradients and optimizer states for every weight"
            + (f" (optimizer states {human_bytes(states)}, {source})" if states else "")
            + "; LoRA r=16 trains adapters of a few MiB instead"
            + (f": saves {human_bytes(saves)}." if saves else ".")
        )
        return [
            Suggestion(
                "lora",
                "lora.r=16 (LoRA on the attention projections)",
                saves,
                "high" if saves else "medium",
                why,
                patch,
            )
        ]
    if cfg.lora.r <= 8:
        return []
    patch = {"lora.r": 8}
    saves = ctx.what_if(patch)
    if saves is None:
        return []
    helps = ctx.shortfall is None or saves >= CANNOT_HELP_SHARE * max(ctx.shortfall, 1)
    why = f"Lowering lora.r from {cfg.lora.r} to 8 saves {human_bytes(saves)}" + (
        "."
        if helps
        else ": not your problem. The adapters are a rounding error next to the activations "
        "through the frozen base, which LoRA stores as full fine-tuning does."
    )
    return [Suggestion("lora", "lora.r=8", saves, "high", why, patch, helps=helps)]


def _lora_targets(cfg: RunConfig) -> list[str]:
    """The model's attention projections by its own module names (c_attn/c_proj for GPT-2 and
    GPTBigCode, qkv_proj/o_proj for Phi-3): names it lacks would make peft refuse the fix."""
    from diagnosis.architecture import ArchitectureError, shape_for

    try:
        shape = shape_for(cfg.model.name)
    except (ArchitectureError, OSError):
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    return list(dict.fromkeys(linear.name for linear in shape.linear_layers() if linear.block == "attention"))


def _rule_optimizer_8bit(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    if cfg is None or cfg.train.optimizer not in ("adamw", "paged_adamw"):
        return []
    states, source = _component(ctx, "optimizer_states")
    patch = {"train.optimizer": "adamw_8bit"}
    saves = ctx.what_if(patch)
    if not saves or saves < 16 * MIB:
        return []
    why = (
        f"AdamW keeps two states per trainable weight ({human_bytes(states)}, {source}); bitsandbytes' 8-bit AdamW "
        f"keeps them in one byte each: saves {human_bytes(saves)} (CUDA only)."
    )
    return [Suggestion("optimizer_8bit", _change_text(patch), saves, "medium", why, patch)]


def _rule_mixed_precision(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    if cfg is None or cfg.model.dtype != "fp32":
        return []
    patch: dict[str, Any] = {"model.dtype": "bf16", "train.mixed_precision": "no"}
    saves = ctx.what_if(patch)
    if not saves or saves <= 0:
        return []
    why = (
        "The weights are fp32: bf16 weights (pure bf16 training, common with LoRA) halve weights, gradients, "
        f"optimizer states and activations: saves {human_bytes(saves)}. Needs a GPU with bf16 (Ampere or newer)."
    )
    return [Suggestion("mixed_precision", _change_text(patch), saves, "medium", why, patch)]


def _rule_quantization(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    if cfg is None or cfg.lora is None or cfg.model.quantization != "none":
        return []
    patch = {"model.quantization": "nf4"}
    saves = ctx.what_if(patch)
    if not saves or saves < 64 * MIB:
        return []
    params, source = _component(ctx, "parameters")
    why = (
        f"The frozen base weights ({human_bytes(params)}, {source}) can be stored in 4 bits (QLoRA, bitsandbytes): "
        f"saves {human_bytes(saves)}, at some speed and a small accuracy cost."
    )
    return [Suggestion("quantization", _change_text(patch), saves, "medium", why, patch)]


def _rule_bitsandbytes(ctx: _Context) -> list[Suggestion]:
    """An old bitsandbytes keeps every 4-bit linear's input for a backward that never uses it."""
    cfg = ctx.ev.config
    if cfg is None or cfg.model.quantization != "nf4" or ctx.base is None or ctx.estimator is None:
        return []
    version = version_that_runs("bitsandbytes", ctx.ev.bitsandbytes_version)
    if not bitsandbytes_keeps_matmul_input(version):
        return []
    fixed = release(BNB_MATMUL4BIT_DROPS_INPUT)
    after = _estimate(ctx.ev, ctx.estimator, cfg, ctx.device, bitsandbytes=fixed)
    saves = ctx.base.device_bytes - after.device_bytes
    if saves < 64 * MIB:
        return []
    why = (
        f"bitsandbytes {version} keeps the input of every 4-bit linear for its backward, which never uses it "
        f"(the frozen weights get no gradient; bitsandbytes#1270, fixed in {fixed}): upgrading saves "
        f"{human_bytes(saves)} and changes nothing else."
    )
    return [Suggestion("quantization", f"pip install 'bitsandbytes>={fixed}'", saves, "high", why)]


def _rule_zero_offload(ctx: _Context) -> list[Suggestion]:
    cfg = ctx.ev.config
    # litgpt shards with its own FSDP setup (whole Blocks wrapped, checkpointed), which the estimate
    # does not model, and never with DeepSpeed: no change here would mean what it says for it.
    if cfg is None or cfg.model.implementation == "litgpt":
        return []
    if cfg.fsdp is not None:
        return _fsdp_sharding(ctx, cfg)
    out = []
    stage = cfg.deepspeed.zero_stage if cfg.deepspeed else 0
    if cfg.train.num_gpus > 1 and stage < 3:
        patch = {"deepspeed.zero_stage": 3 if stage >= 2 else 2}
        saves = ctx.what_if(patch)
        if saves and saves > 0:
            why = (
                f"Across {cfg.train.num_gpus} GPUs ZeRO stage {patch['deepspeed.zero_stage']} shards optimizer states "
                f"and gradients{' and weights' if patch['deepspeed.zero_stage'] == 3 else ''}: "
                f"saves {human_bytes(saves)} per GPU."
            )
            out.append(Suggestion("zero", _change_text(patch), saves, "medium", why, patch))
    if cfg.train.num_gpus > 1 and stage == 0:
        out += _fsdp_instead(ctx, cfg, out[0].saves_bytes if out else None)
    offload = cfg.deepspeed.offload_optimizer if cfg.deepspeed else "none"
    if offload == "none":
        patch = {"deepspeed.zero_stage": max(stage, 2), "deepspeed.offload_optimizer": "cpu"}
        saves = ctx.what_if(patch)
        if saves and saves > 16 * MIB:
            why = (
                f"Moving optimizer states to host memory (ZeRO-Offload) saves {human_bytes(saves)} on the GPU, "
                "at a large cost in step time; needs DeepSpeed."
            )
            out.append(Suggestion("offload", _change_text(patch), saves, "low", why, patch))
    return out


def _fsdp_instead(ctx: _Context, cfg: RunConfig, zero_saves: int | None) -> list[Suggestion]:
    """FSDP beside ZeRO for a data-parallel run that shards nothing yet: its optimizer keeps the states
    in the weights' dtype with no fp32 master copy, so for 16-bit weights it can save more."""
    patch: dict[str, Any] = {"fsdp.sharding_strategy": "full_shard"}
    saves = ctx.what_if(patch)
    if not saves or saves <= 0 or (zero_saves is not None and saves <= zero_saves):
        return []
    than = f" ({human_bytes(saves - zero_saves)} more than the ZeRO change above)" if zero_saves else ""
    why = (
        f"PyTorch FSDP (full_shard) shards weights, gradients and optimizer states across the {cfg.train.num_gpus} "
        f"GPUs, and its optimizer keeps the states in the weights' dtype with no fp32 master copy: saves "
        f"{human_bytes(saves)} per GPU{than}."
    )
    return [Suggestion("zero", _change_text(patch), saves, "medium", why, patch)]


def _fsdp_sharding(ctx: _Context, cfg: RunConfig) -> list[Suggestion]:
    """The same two levers as ZeRO, in the keys of a run that already uses FSDP."""
    assert cfg.fsdp is not None
    out = []
    if cfg.train.num_gpus > 1 and cfg.fsdp.sharding_strategy != "full_shard":
        patch: dict[str, Any] = {"fsdp.sharding_strategy": "full_shard"}
        saves = ctx.what_if(patch)
        if saves and saves > 0:
            why = (
                f"FSDP FULL_SHARD also shards the weights across the {cfg.train.num_gpus} GPUs and gathers one "
                f"decoder layer at a time (ZeRO-3's split): saves {human_bytes(saves)} per GPU."
            )
            out.append(Suggestion("zero", _change_text(patch), saves, "medium", why, patch))
    if not cfg.fsdp.offload_params and cfg.train.num_gpus > 1:
        patch = {"fsdp.offload_params": True}
        if cfg.fsdp.sharding_strategy == "no_shard":
            patch["fsdp.sharding_strategy"] = "full_shard"
        saves = ctx.what_if(patch)
        if saves and saves > 16 * MIB:
            why = (
                f"FSDP CPU offload keeps the weight, gradient and optimizer shards in host memory: saves "
                f"{human_bytes(saves)} on the GPU, at a large cost in step time."
            )
            out.append(Suggestion("offload", _change_text(patch), saves, "low", why, patch))
    return out


def _rule_leak(ctx: _Context) -> list[Suggestion]:
    details = (ctx.ev.postmortem or {}).get("finding_details") or {}
    trend = details.get("trend")
    if not trend:
        return []
    growth = int(trend.get("growth_bytes", 0))
    per_step = trend.get("bytes_per_step", 0)
    cfg = ctx.ev.config
    if cfg is not None and cfg.debug.leak_mb_per_step > 0:
        patch: dict[str, Any] = {"debug.leak_mb_per_step": 0}
        change = "debug.leak_mb_per_step=0"
    else:
        patch, change = {}, "keep no tensors across steps (log loss.item(), not loss; clear caches)"
    why = (
        f"Memory grew {human_bytes(per_step)} per step since step {trend.get('since_step')} "
        f"({human_bytes(growth)} in all): something keeps tensors alive across steps. "
        "No config change fixes a leak; a smaller batch only delays it."
    )
    return [Suggestion("leak", change, growth, "high", why, patch)]


def _rule_other_process(ctx: _Context) -> list[Suggestion]:
    msg = ctx.ev.message
    if msg is None or _on_cpu(ctx.ev):
        return []
    out = []
    others = [p for p in msg.process_bytes if p.pid is not None and p.bytes]
    if len(others) > 1:
        # The failing process is one of those listed; the others hold memory it cannot use.
        biggest = sorted(others, key=lambda p: p.bytes or 0, reverse=True)
        listed = ", ".join(f"process {p.pid} holds {human_bytes(p.bytes)}" for p in biggest[:4])
        why = f"Several processes share GPU {msg.device}: {listed}. Stop the ones that are not this training."
        held = sum(p.bytes or 0 for p in biggest[1:])
        out.append(Suggestion("other_process", "stop the other processes on this GPU", held, "medium", why))
    outside = msg.outside_pytorch_bytes
    if outside is not None and outside > GIB and not out:
        why = (
            f"{human_bytes(outside)} of the GPU was held outside PyTorch's allocator (total − free − reserved): "
            "the CUDA context (~0.3–1 GiB), NCCL buffers, or other processes. Check nvidia-smi for other processes."
        )
        out.append(
            Suggestion(
                "other_process",
                "check nvidia-smi for other processes on this GPU",
                None,
                "low",
                why,
                saves_reason="which part is another process is not in the message",
            )
        )
    return out


def _rule_host_memory(ctx: _Context) -> list[Suggestion]:
    if not _on_cpu(ctx.ev):
        return []
    requested = requested_bytes(ctx.ev)
    cfg = ctx.ev.config
    limit = f" (memory.limit_gb={cfg.memory.limit_gb:g})" if cfg and cfg.memory.limit_gb else ""
    why = (
        "Host memory ran out: the CPU allocator failed"
        + (f" on a {human_bytes(requested)} request" if requested else "")
        + f"{limit}. Raise the budget, or make the step smaller with the fixes above."
    )
    patch = {"memory.limit_gb": None} if limit else {}
    change = "memory.limit_gb=null (or more host RAM)" if limit else "more host RAM, or a smaller step"
    return [Suggestion("host_memory", change, None, "medium", why, patch, "depends on the machine's free RAM")]


_SAVE_FRAMES = re.compile(r"save_pretrained|_save_checkpoint|save_model|torch\.save|safetensors|state_dict\(")


def _rule_checkpoint_save(ctx: _Context) -> list[Suggestion]:
    location = ctx.ev.message.location if ctx.ev.message is not None else None
    if location != "checkpoint_save" and not _SAVE_FRAMES.search(_frames_text(ctx.ev)):
        return []
    why = (
        "It failed while saving a checkpoint, not while training: gathering a full state dict (ZeRO-3 / FSDP) "
        "or copying tensors for the save needs memory the step freed. Save LoRA adapters only, gather to the CPU "
        "(stage3_gather_16bit_weights_on_model_save=false, offload_to_cpu), or free the optimizer before saving."
    )
    return [
        Suggestion(
            "checkpoint_save",
            "save from a CPU state dict (adapters only for LoRA)",
            None,
            "medium",
            why,
            saves_reason="the save path's extra copy is not in the evidence",
        )
    ]


_RULES = (
    _rule_alloc_conf,
    _rule_efficient_attention,
    _rule_chunked_loss,
    _rule_checkpointing,
    _rule_reduce_batch,
    _rule_reduce_seq_len,
    _rule_lora,
    _rule_optimizer_8bit,
    _rule_mixed_precision,
    _rule_quantization,
    _rule_bitsandbytes,
    _rule_zero_offload,
    _rule_leak,
    _rule_other_process,
    _rule_host_memory,
    _rule_checkpoint_save,
)


# --- ranking ----------------------------------------------------------------------------------------


def _judge(s: Suggestion, shortfall: int | None) -> Suggestion:
    """Mark whether the saving closes the shortfall, and fixes that save next to nothing."""
    if s.saves_bytes is None or shortfall is None or s.category in _DIAGNOSTICS:
        return s
    sufficient = shortfall <= 0 or s.saves_bytes >= shortfall
    helps = s.helps and (shortfall <= 0 or s.saves_bytes >= CANNOT_HELP_SHARE * shortfall)
    if s.helps and not helps:
        why = s.why.rstrip(".") + f": a {human_bytes(shortfall)} shortfall, so this cannot help on its own."
        return dataclasses.replace(s, sufficient=False, helps=False, why=why)
    return dataclasses.replace(s, sufficient=sufficient, helps=helps)


_CONFIDENCE_RANK = {"high": 0, "medium": 1, "low": 2}


def _rank_key(s: Suggestion) -> tuple:
    if not s.helps:
        return (4, -(s.saves_bytes or 0))
    if s.category == "leak":
        return (0, 0, 0)
    if s.sufficient:
        return (1, _COST_ORDER.index(s.category) if s.category in _COST_ORDER else 99, -(s.saves_bytes or 0))
    if s.category in _DIAGNOSTICS:
        return (3, _CONFIDENCE_RANK[s.confidence], 0)
    return (2, -(s.saves_bytes or 0), _CONFIDENCE_RANK[s.confidence])


def _default_estimator() -> Estimator | None:
    try:
        from diagnosis.analytic import estimate_analytic
    except ImportError:  # pragma: no cover - the analytic model ships with diagnosis
        return None
    return estimate_analytic


def _context(ev: Evidence, estimator: Estimator | None) -> _Context:
    """The evidence with its config estimated as is (the base every what-if is measured against)."""
    estimator = estimator or _default_estimator()
    device = "cpu" if _on_cpu(ev) else "cuda"
    base = _estimate(ev, estimator, ev.config, device) if ev.config is not None and estimator is not None else None
    return _Context(ev, estimator, device, base, _shortfall(ev, base), failed_request_matches(ev))


def suggest(ev: Evidence, estimator: Estimator | None = None) -> list[Suggestion]:
    """Every applicable fix, best first (see the module docstring for the order)."""
    ctx = _context(ev, estimator)
    found = [s for rule in _RULES for s in rule(ctx)]
    judged = [_judge(s, ctx.shortfall) for s in found]
    return sorted(judged, key=_rank_key)


def shortfall_bytes(ev: Evidence, estimator: Estimator | None = None) -> int | None:
    """Bytes the failing step lacked (for headlines); None when nothing says."""
    return _context(ev, estimator).shortfall


def suggestions_json(items: Sequence[Suggestion]) -> dict[str, Any]:
    return {"suggestions": [s.to_json() for s in items]}
