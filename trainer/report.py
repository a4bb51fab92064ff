"""Plain-text views of recorded runs for the terminal (`python -m trainer runs|show`)."""

from __future__ import annotations

from collections.abc import Sequence

from db.queries import PostmortemRecord, RunRecord, StepRecord
from diagnosis.device_use import device_use_at_failure
from diagnosis.suggest import Suggestion
from diagnosis.units import human_bytes


def run_line(run: RunRecord) -> str:
    model = run.config.get("model", {}).get("name", "?")
    return f"{run.id:>5}  {run.status:<9}  {model:<24}  {run.device or '-':<8}  {run.name or ''}"


def run_report(run: RunRecord, steps: list[StepRecord]) -> str:
    env = run.environment or {}
    nvml = env.get("nvml", {})
    lines = [
        f"run {run.id}: {run.status}" + (f" (exit code {run.exit_code})" if run.exit_code is not None else ""),
        f"  model {run.config['model']['name']}, attention {env.get('attn_implementation', '?')}, "
        f"device {run.device} ({run.device_name}), {len(steps)} steps recorded",
        "  NVML: " + ("sampled" if nvml.get("sampled") else f"unavailable ({nvml.get('reason', 'not recorded')})"),
    ]
    if run.samples_dropped:
        lines.append(f"  WARNING: {run.samples_dropped} samples were dropped (the database could not keep up)")
    if steps:
        columns = ("params", "grads", "optimizer", "activations", "allocated", "peak alloc", "RSS")
        lines.append("  step      loss  tokens/s" + "".join(f"{name:>12}" for name in columns))
        for s in steps:
            loss = f"{s.loss:9.4f}" if s.loss is not None else "      n/a"
            values = (
                s.parameter_bytes,
                s.gradient_bytes,
                s.optimizer_state_bytes,
                s.activation_bytes,
                s.allocated_bytes,
                s.peak_allocated_bytes,
                s.rss_bytes,
            )
            cells = "".join(f"{human_bytes(value):>12}" for value in values)
            lines.append(f"  {s.step:>4} {loss} {s.tokens_per_s or 0:>9,.0f}{cells}")
    if run.error_text:
        lines.append("  last lines of the error:")
        lines.extend("    " + line for line in run.error_text.strip().splitlines()[-3:])
    return "\n".join(lines)


def postmortem_report(pm: PostmortemRecord, fixes: Sequence[Suggestion] = (), request: str | None = None) -> str:
    """`request`: what the failed request was (diagnosis.failed_request.request_sentence)."""
    shape = pm.batch_shape or {}
    lines = [
        f"run {pm.run_id} ran out of memory at step {pm.step}, micro-batch {pm.micro_batch}, "
        f"in {pm.phase} of {pm.module or '(no module)'}",
        f"  batch: {shape.get('batch_size', '?')} x {shape.get('seq_len', '?')} tokens; "
        f"failed request: {human_bytes(pm.requested_bytes)} on {pm.device}",
        *([f"  {request}"] if request else []),
        f"  finding: {pm.finding}",
        f"  {pm.error_type}: {pm.error_text.strip().splitlines()[-1] if pm.error_text.strip() else ''}",
    ]
    if pm.device_total_bytes is not None:
        lines.append(f"  device: {human_bytes(pm.device_free_bytes)} free of {human_bytes(pm.device_total_bytes)}")
    use = device_use_at_failure(pm.nvml)
    if use is not None and use.available:
        lines.append(f"  GPU at the failure (NVML, {use.taken}): {use.text}")
    elif use is not None:
        lines.append(f"  GPU (NVML): no reading ({use.text})")
    if pm.tensors:
        t = pm.tensors
        saved = t.get("activation_bytes")  # None: a carried forward (collector.tensors.ActivationCounter)
        lines.append(
            f"  tensors at the failure: parameters {human_bytes(t.get('parameter_bytes'))}, "
            f"gradients {human_bytes(t.get('gradient_bytes'))}, "
            f"optimizer {human_bytes(t.get('optimizer_state_bytes'))}, "
            f"activations so far {human_bytes(saved) if saved is not None else 'not counted on this step'}"
        )
    if pm.layer_profile:
        top = sorted(pm.layer_profile, key=lambda layer: layer["activation_bytes"], reverse=True)[:5]
        lines.append("  layers by activation memory (profiled step):")
        for layer in top:
            mark = "  <- failed here" if layer["module"] == pm.module else ""
            lines.append(f"    {human_bytes(layer['activation_bytes']):>12}  {layer['module']}{mark}")
    lines.append(f"  snapshot: {pm.snapshot_path or pm.snapshot_note}")
    if fixes:
        lines.append("  fixes, best first:")
        for rank, fix in enumerate(fixes, 1):
            saves = human_bytes(fix.saves_bytes) if fix.saves_bytes is not None else "?"
            verdict = "" if fix.helps else " (cannot help)"
            lines.append(f"    {rank}. {fix.change}  saves {saves}{verdict}")
            lines.append(f"       {fix.why}")
    return "\n".join(lines)
