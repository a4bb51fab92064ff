"""What a post-mortem adds to the Run page: the memory at the failure, when no step was recorded."""

from __future__ import annotations

from db.queries import LayerRecord, PostmortemRecord
from diagnosis.units import human_bytes


def layers_at_failure(postmortem: PostmortemRecord, limit: int = 15) -> list[LayerRecord]:
    """The post-mortem's own layer profile, largest first: all there is when the run died on a profiled step."""
    layers = [
        LayerRecord(
            run_id=postmortem.run_id,
            step=layer.get("step", postmortem.step),
            module=layer["module"],
            activation_bytes=layer["activation_bytes"],
            forward_alloc_delta_bytes=layer.get("forward_alloc_delta_bytes"),
            forward_peak_bytes=layer.get("forward_peak_bytes"),
            backward_peak_bytes=layer.get("backward_peak_bytes"),
        )
        for layer in postmortem.layer_profile
        if layer.get("module") and layer.get("activation_bytes") is not None
    ]
    return sorted(layers, key=lambda layer: (-layer.activation_bytes, layer.module))[:limit]


def tensors_at_failure(postmortem: PostmortemRecord) -> str | None:
    tensors = postmortem.tensors
    if not tensors:
        return None
    parts = [
        f"parameters {human_bytes(tensors.get('parameter_bytes'))}",
        f"gradients {human_bytes(tensors.get('gradient_bytes'))}",
        f"optimizer states {human_bytes(tensors.get('optimizer_state_bytes'))}",
        f"activations so far {_activations_text(tensors.get('activation_bytes'))}",
    ]
    rss = (postmortem.host or {}).get("rss_bytes")
    if rss is not None:
        parts.append(f"process RSS {human_bytes(rss)}")
    return "At the failure: " + ", ".join(parts) + "."


def _activations_text(value: int | None) -> str:
    # None: the failing forward was one the collector carried rather than counted (a batch shape
    # counted before; see collector.tensors.ActivationCounter), so how far it got is not known.
    return human_bytes(value) if value is not None else "not counted on this step (its batch shape was, earlier)"
