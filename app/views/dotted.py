"""Configs as dotted keys with YAML values: the form `--set` takes, so what a page shows can be typed back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"model": {"name": "x"}, "lora": None}` → `{"model.name": "x", "lora": None}`.

    A null section stays one key (`lora: null` is full fine-tuning), so it can be told from a
    section whose keys all happen to be null.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def yaml_value(value: Any) -> str:
    """A value as one line of YAML (`null`, `true`, `[q_proj, v_proj]`), as `--set key=VALUE` reads it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    # safe_dump ends a lone scalar with a document end marker.
    return text.removesuffix("...").strip()


def section(config: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key, or None where a part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node
