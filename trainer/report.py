"""Plain-text views of recorded runs for the terminal (`python -m trainer runs|show`)."""

from __future__ import annotations

from db.queries import RunRecord, StepRecord

_UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def human_bytes(value: int | None) -> str:
    """'n/a' for an unavailable reading, so it never reads as zero."""
    if value is None:
        return "n/a"
    for unit, size in _UNITS:
        if abs(value) >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value} B"


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
                s.parameter_bytes, s.gradient_bytes, s.optimizer_state_bytes, s.activation_bytes,
                s.allocated_bytes, s.peak_allocated_bytes, s.rss_bytes,
            )
            cells = "".join(f"{human_bytes(value):>12}" for value in values)
            lines.append(f"  {s.step:>4} {loss} {s.tokens_per_s or 0:>9,.0f}{cells}")
    if run.error_text:
        lines.append("  last lines of the error:")
        lines.extend("    " + line for line in run.error_text.strip().splitlines()[-3:])
    return "\n".join(lines)
