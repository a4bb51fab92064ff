"""Common accelerator cards and the memory a process can actually use on each.

Capacities are the total that `torch.cuda.mem_get_info()` (cudaMemGetInfo) reports, the figure
PyTorch's OOM message prints as "total capacity": a little under the marketing size, because the
driver keeps part of the memory for itself. Values are those seen in published OOM messages; they
move by about ±0.5% with the driver version and ECC setting, so a plan that fits within 1% should
be checked on the card (`diagnosis.estimate.MemoryEstimate.fits` takes any capacity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BYTES_PER_GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    """A card as a user names it and the bytes a process sees."""

    name: str
    capacity_bytes: int
    aliases: tuple[str, ...] = ()
    # CUDA compute capability: it sets the cuBLAS workspace PyTorch keeps (diagnosis.workspaces).
    compute_capability: tuple[int, int] | None = None


def _gib(value: float) -> int:
    return round(value * BYTES_PER_GIB)


GPUS: tuple[Gpu, ...] = (
    Gpu("A100 40GB", _gib(39.39), ("a100 40gb", "a100-sxm4-40gb"), compute_capability=(8, 0)),
    Gpu("A100 80GB", _gib(79.15), ("a100 80gb", "a100-sxm4-80gb"), compute_capability=(8, 0)),
    Gpu("A800 80GB", _gib(79.15), ("a800", "a800 80gb"), compute_capability=(8, 0)),
    Gpu("H100 80GB", _gib(79.11), ("h100", "h100 80gb", "h100 sxm", "h100 80gb hbm3"), compute_capability=(9, 0)),
    Gpu("H200 141GB", _gib(139.80), ("h200", "h200 141gb"), compute_capability=(9, 0)),
    Gpu("L40S 48GB", _gib(44.52), ("l40s", "l40s 48gb"), compute_capability=(8, 9)),
    Gpu("L4 24GB", _gib(22.03), ("l4", "l4 24gb"), compute_capability=(8, 9)),
    Gpu("A10G 24GB", _gib(22.06), ("a10g", "a10g 24gb"), compute_capability=(8, 6)),
    Gpu("T4 16GB", _gib(14.75), ("t4", "t4 16gb", "tesla t4"), compute_capability=(7, 5)),
    Gpu("V100 16GB", _gib(15.77), ("v100 16gb", "v100-sxm2-16gb"), compute_capability=(7, 0)),
    Gpu("V100 32GB", _gib(31.75), ("v100 32gb", "v100-sxm2-32gb"), compute_capability=(7, 0)),
    Gpu("RTX 3090 24GB", _gib(23.69), ("3090", "rtx 3090", "geforce rtx 3090"), compute_capability=(8, 6)),
    Gpu("RTX 4090 24GB", _gib(23.64), ("4090", "rtx 4090", "geforce rtx 4090"), compute_capability=(8, 9)),
    Gpu("RTX 5090 32GB", _gib(31.36), ("5090", "rtx 5090", "geforce rtx 5090"), compute_capability=(12, 0)),
)


class UnknownGpuError(KeyError):
    """A card name that matches no known card (or several)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def _key(text: str) -> str:
    """`NVIDIA A100-SXM4-80GB` → `a100sxm480`: case, punctuation, vendor words and "GB" ignored."""
    key = re.sub(r"[^a-z0-9]", "", text.lower())
    for word in ("nvidia", "geforce", "tesla"):
        key = key.replace(word, "")
    return key.replace("gb", "")


def _index() -> dict[str, Gpu]:
    index: dict[str, Gpu] = {}
    for gpu in GPUS:
        for spelling in (gpu.name, *gpu.aliases):
            index[_key(spelling)] = gpu
    return index


_INDEX = _index()


def known_gpus() -> tuple[str, ...]:
    return tuple(gpu.name for gpu in GPUS)


def find_gpu(name: str) -> Gpu:
    """The card named `name`, however spelled ("a100-80gb", "A100 80GB", "H100", "rtx4090")."""
    key = _key(name)
    if key in _INDEX:
        return _INDEX[key]
    matches = {gpu.name: gpu for spelled, gpu in _INDEX.items() if key and spelled.startswith(key)}
    if len(matches) == 1:
        return next(iter(matches.values()))
    known = ", ".join(known_gpus())
    if matches:
        raise UnknownGpuError(f"{name!r} is ambiguous: {', '.join(sorted(matches))}; say which (known: {known})")
    raise UnknownGpuError(f"unknown GPU {name!r}; known: {known} (or give a capacity in bytes)")


def gpu_capacity_bytes(name: str) -> int:
    return find_gpu(name).capacity_bytes


def compute_capability_of(name: str | None) -> tuple[int, int] | None:
    """The card's compute capability, None for no name or one not in the table (the estimate then
    says which card it assumed)."""
    if not name:
        return None
    try:
        return find_gpu(name).compute_capability
    except UnknownGpuError:
        return None
