"""Plan: will a fine-tune fit on a card, where the bytes go, and the longest sequence / largest batch that does."""

import streamlit as st

from app import diagnosis_charts, estimates, plan_fields
from app.views import plan as view
from diagnosis import accuracy
from diagnosis.estimate import MemoryEstimate
from diagnosis.reserve import RESERVE_FRACTION, RESERVE_FRACTION_RANGE
from diagnosis.units import human_bytes
from trainer.config import RunConfig

KEY = "plan."
_TRACED = "plan.traced_result"  # ((config YAML, card), estimate or message) of the last traced estimate


def _inputs() -> tuple[RunConfig | None, tuple[str, int] | None, dict | None]:
    with st.container(border=True):
        st.subheader("Model and card")
        name, shape = plan_fields.model_input(KEY)
        gpu = plan_fields.gpu_input(KEY)
    if name is None:
        return None, gpu, None
    with st.container(border=True):
        st.subheader("Knobs")
        values = plan_fields.knobs(KEY, shape)
    cfg, issues = view.check(view.config_from_knobs(values, name), shape)
    for issue in issues:
        st.error(f"`{issue.key}`: {issue.message}", icon=":material/error:")
    if issues:
        st.caption("No estimate until the knobs above agree; each message names the knob and what it allows.")
    return cfg, gpu, values


def _estimate(cfg: RunConfig, gpu: tuple[str, int]) -> MemoryEstimate:
    label, capacity = gpu
    estimate = estimates.analytic(cfg.to_yaml(), gpu=label)
    fits, margin = view.margin_text(estimate, capacity)
    # Two by two: four metrics abreast in the results column cut their values short ("48.0 …").
    peak, reserved = st.columns(2)
    device, card = st.columns(2)
    peak.metric("Peak allocated", human_bytes(estimate.peak_allocated_bytes), help="live tensors at the worst moment")
    reserved.metric("Peak reserved", human_bytes(estimate.peak_reserved_bytes), help="what the caching allocator holds")
    device.metric(
        "Device", human_bytes(estimate.device_bytes), help="reserved plus the CUDA context: what nvidia-smi shows"
    )
    card.metric(label, human_bytes(capacity), help="what a process can use on this card")
    (st.success if fits else st.error)(margin)
    trust = accuracy.trust_text(accuracy.measured_error())
    if trust:
        st.caption(trust)
    st.altair_chart(diagnosis_charts.estimate_chart(estimate, capacity), width="stretch")
    st.caption(f"The peak comes in the {estimate.peak_phase}. " + _lora_caption(cfg, label))
    for note in estimate.notes:
        st.caption(f"Note: {note}")
    with st.expander("Where each number comes from"):
        st.dataframe(
            [
                {"Term": term.name, "Size": human_bytes(term.bytes), "Formula": term.formula, "Source": term.source}
                for term in estimate.terms
            ],
            hide_index=True,
            width="stretch",
        )
    return estimate


def _lora_caption(cfg: RunConfig, card: str) -> str:
    if cfg.lora is None:
        return "Full fine-tuning: every weight has a gradient and optimizer states."

    def device_bytes(changed: RunConfig) -> int:
        return estimates.analytic(changed.to_yaml(), gpu=card).device_bytes

    alpha = view.alpha_change_bytes(cfg, device_bytes)
    halved = view.halved_r_saving(cfg, device_bytes)
    parts = []
    if alpha == 0:
        parts.append(
            f"`lora.alpha` changes no memory: the estimate at alpha = {cfg.lora.alpha:g} and at alpha = "
            f"{cfg.lora.alpha * 2:g} is the same to the byte (alpha scales the adapters' output; r sets their size)."
        )
    if halved is not None:
        parts.append(f"Halving r to {cfg.lora.r // 2} would save {human_bytes(halved)}.")
    return " ".join(parts)


def _fits(cfg: RunConfig, gpu: tuple[str, int]) -> None:
    label, capacity = gpu
    st.subheader(f"What fits on {label}")
    rows = estimates.fits(cfg.to_yaml(), capacity, gpu=label)
    mine = rows[0]  # "as is": the knobs above, unchanged
    longest, largest = st.columns(2)
    longest.metric(
        f"Longest seq_len at micro-batch {cfg.train.micro_batch_size}",
        f"{mine.seq_len.value:,} tokens" if mine.seq_len.value is not None else "none fits",
        help=mine.seq_len.reason,
    )
    largest.metric(
        f"Largest micro-batch at seq_len {cfg.data.seq_len:,}",
        f"{mine.micro_batch_size.value:,}" if mine.micro_batch_size.value is not None else "none fits",
        help=mine.micro_batch_size.reason,
    )
    st.dataframe(view.fit_frame(rows, cfg), hide_index=True, width="stretch")
    low, high = RESERVE_FRACTION_RANGE
    st.caption(
        "Each row keeps the changes of the rows above it. A fit is judged on the device level: the CUDA context "
        f"and the caching allocator's reserve at its measured median ({RESERVE_FRACTION:.1%} of the peak; real runs "
        f"held {low:.1%} to {high:.1%}) included, so a fit with less margin than that spread may not hold."
    )


def _side_by_side(cfg: RunConfig, analytic: MemoryEstimate, values: dict, gpu: tuple[str, int]) -> None:
    """The same knobs on a second model: where two models of about the same size differ."""
    with st.expander("Side by side with another model", icon=":material/compare_arrows:"):
        st.caption("The knobs above on a second model: which one needs more, and which part of the step says why.")
        other_name, other_shape = plan_fields.model_input(KEY + "other.", default="yi-34b")
        if other_name is None or other_shape is None:
            return
        other, issues = view.check(view.config_from_knobs(values, other_name), other_shape)
        if other is None:
            for issue in issues:
                st.warning(f"`{issue.key}` on the second model: {issue.message}", icon=":material/error:")
            return
        label, capacity = gpu
        other_estimate = estimates.analytic(other.to_yaml(), gpu=label)
        names = (_short_name(cfg.model.name), _short_name(other_name))
        if names[0] == names[1]:
            names = (f"{names[0]} (1)", f"{names[1]} (2)")
        pair, shapes = (analytic, other_estimate), (view.model_shape(cfg.model.name), other_shape)
        if shapes[0] is not None:
            st.markdown(view.side_by_side_summary(names, pair, shapes))
            st.dataframe(view.side_by_side_frame(names, pair, shapes), hide_index=True, width="stretch")
        _, margin = view.margin_text(other_estimate, capacity)
        st.markdown(f"**{names[1]} on {label}**: {margin}")
        by_model = dict(zip(names, pair, strict=True))
        st.altair_chart(diagnosis_charts.compare_chart(by_model, capacity, "Peak allocated, by model"), width="stretch")


def _short_name(name: str) -> str:
    # An uploaded config.json is stored under a content hash; the preset names read as themselves.
    return "uploaded config.json" if name.endswith(".json") else name


def _traced(cfg: RunConfig, analytic: MemoryEstimate, gpu: tuple[str, int]) -> None:
    label, capacity = gpu
    st.subheader("Traced estimate")
    config_yaml = cfg.to_yaml()
    asked = (config_yaml, label)  # the card sets the cuBLAS workspaces the trace adds
    if st.button(
        "Run the traced estimate (slow)",
        icon=":material/science:",
        key=KEY + "traced",
        help="builds the real transformers model under fake tensors on the CPU and tracks one step: no weights, "
        "no GPU; about 10 to 60 s",
    ):
        from diagnosis.traced import TracedEstimateUnsupported, estimate_traced

        with st.spinner("Tracing one training step of the real model under fake tensors…"):
            try:
                st.session_state[_TRACED] = (asked, estimate_traced(cfg, gpu=label))
            except TracedEstimateUnsupported as error:
                st.session_state[_TRACED] = (asked, f"The traced estimate cannot model this config: {error}")
            except Exception as error:  # noqa: BLE001 - transformers can fail in many ways; the analytic one stands
                st.session_state[_TRACED] = (
                    asked,
                    f"The traced estimate failed ({type(error).__name__}: {error}); the analytic one above stands.",
                )
    done = st.session_state.get(_TRACED)
    if done is None or done[0] != asked:
        st.caption("Not run for these knobs and this card yet.")
        return
    result = done[1]
    if isinstance(result, str):
        st.warning(result)
        return
    _, margin = view.margin_text(result, capacity)
    peak, device = human_bytes(result.peak_allocated_bytes), human_bytes(result.device_bytes)
    st.markdown(f"Traced: peak allocated {peak}, device {device}. {margin}")
    st.altair_chart(diagnosis_charts.compare_chart({"analytic": analytic, "traced": result}, capacity), width="stretch")


st.title("Plan")
st.caption(
    "Will a fine-tune fit before you launch it: the peak of one training step, where its bytes go, and the longest "
    "sequence or largest micro-batch that fits the card. Estimated from formulas in milliseconds (the analytic "
    "model); a traced estimate of the real model is one click further down."
)
inputs, results = st.columns([2, 3], gap="large")
with inputs:
    cfg, gpu, values = _inputs()
with results:
    if cfg is None or gpu is None:
        st.info("Pick a model and a card, and set the knobs: the estimate appears here.")
    else:
        analytic = _estimate(cfg, gpu)
        _fits(cfg, gpu)
        _side_by_side(cfg, analytic, values, gpu)
        _traced(cfg, analytic, gpu)
        with st.expander("The config estimated (`--config` for `python -m diagnosis estimate`)"):
            st.code(cfg.to_yaml(), language="yaml")
