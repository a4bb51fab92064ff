"""Estimates for the Plan and Diagnose pages, cached by the config's YAML text.

The analytic model takes ~2 ms, but a fit table runs it a few hundred times (~1 s) and every
widget change reruns the page; the YAML is the cache key because it is what the estimate depends
on, and a RunConfig is rebuilt from it inside. Nothing here expires: an estimate of a config
never changes.
"""

from __future__ import annotations

from functools import partial

import streamlit as st
import yaml

from diagnosis.analytic import estimate_analytic
from diagnosis.estimate import MemoryEstimate
from diagnosis.fit import FitRow, fit_table
from diagnosis.oom_text import OomMessage
from diagnosis.suggest import Evidence, Suggestion, failed_request_text, suggest
from trainer.config import RunConfig, validate_config


def _config(config_yaml: str) -> RunConfig:
    return validate_config(yaml.safe_load(config_yaml))


@st.cache_data(show_spinner=False, max_entries=256)
def analytic(config_yaml: str, device: str = "cuda", gpu: str | None = None) -> MemoryEstimate:
    """`gpu`: the card's name (its compute capability sets the cuBLAS workspaces); None or a
    name not in diagnosis.gpus' table: not known, and the estimate says what it assumed."""
    return estimate_analytic(_config(config_yaml), device=device, gpu=gpu)


@st.cache_data(show_spinner="Searching the longest sequence and the largest micro-batch that fit…", max_entries=64)
def fits(config_yaml: str, capacity_bytes: int, gpu: str | None = None) -> tuple[FitRow, ...]:
    return fit_table(_config(config_yaml), capacity_bytes, estimator=partial(estimate_analytic, gpu=gpu))


@st.cache_data(show_spinner=False, max_entries=64)
def suggestions(
    config_yaml: str | None,
    message: OomMessage | None,
    snapshot: dict | None,
    capacity_bytes: int | None,
    torch_version: str | None,
    gpu_name: str | None = None,
) -> list[Suggestion]:
    """diagnosis.suggest over what the user gave; its what-ifs estimate the config a dozen times."""
    cfg = _config(config_yaml) if config_yaml is not None else None
    return suggest(
        Evidence(cfg, message, None, snapshot, capacity_bytes, torch_version=torch_version, gpu_name=gpu_name)
    )


def failed_request(config_yaml: str | None, message: OomMessage | None) -> str | None:
    """What the pasted message's failed request was, for the described run (diagnosis.failed_request)."""
    if config_yaml is None or message is None:
        return None
    return failed_request_text(Evidence(_config(config_yaml), message))
