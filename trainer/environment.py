"""What a run ran on, recorded once at start so two runs can be told apart later
(scenario 5: the attention implementation actually loaded, not the one asked for)."""

from __future__ import annotations

import os
import platform
import socket
import sys
from importlib import metadata
from typing import Any

import torch

_PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "flash-attn")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "versions": package_versions(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda_version": torch.version.cuda,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    return info
