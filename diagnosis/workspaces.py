"""The cuBLAS and cuBLASLt workspaces PyTorch takes from its own caching allocator.

They are tensors to the allocator: they count in `memory_allocated()`, in the OOM message's
"allocated by PyTorch", and in every peak, and `empty_cache()` never returns them. A training step
holds one cuBLAS workspace per thread that runs matmuls, per stream: the forward's and the autograd
engine's device thread's, so two. Measured on an H100 (torch 2.11.0+cu130, tests/fixtures/gpu/):
67,108,864 bytes held after tiny-llama's first step (2 × 32 MiB) and 1 MiB more once a biased
linear had run (GPT-2's Conv1D, Qwen2's q/k/v), the persistent cuBLASLt workspace.

Sources (aten/src/ATen/cuda/CublasHandlePool.cpp, getChosenWorkspaceSize / getCUDABlasLtWorkspace):
- per (handle, stream), handles per thread; default `CUBLAS_WORKSPACE_CONFIG` `:4096:8` (32 MiB) on
  sm_90 since torch 2.0 (pytorch#91564), `:4096:2:16:8` (8,519,680 bytes) on every other card
  until 2.11; from 2.12 Blackwell (sm_100, sm_120) takes 32 MiB too (pytorch#175344);
- cuBLASLt (addmm with a 1-D bias goes through gemm_and_bias): a 1 MiB workspace taken and freed
  in each call before 2.9, kept per (handle, stream) from 2.9 (pytorch#156495), and shared with the
  cuBLAS one from 2.12 (pytorch#175879). The backward of addmm is plain mm: only the forward's
  thread keeps one.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2
HOPPER_WORKSPACE_BYTES = 4096 * 1024 * 8  # ":4096:8"
OTHER_WORKSPACE_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8  # ":4096:2:16:8"
LT_WORKSPACE_BYTES = 1 * MIB
MATMUL_THREADS = 2  # the step's own thread and the autograd engine's device thread

LT_KEPT_FROM = (2, 9)
LT_SHARED_FROM = (2, 12)
BLACKWELL_32MIB_FROM = (2, 12)

SRC_WORKSPACES = (
    "aten/src/ATen/cuda/CublasHandlePool.cpp (getChosenWorkspaceSize, getCUDABlasLtWorkspace); "
    "pytorch#91564, #156495, #175879; measured on an H100, torch 2.11 (tests/fixtures/gpu/)"
)


@dataclass(frozen=True)
class Workspaces:
    bytes: int
    formula: str


def cublas_workspaces(
    compute_capability: tuple[int, int] | None, torch_version: tuple[int, ...] | None, biased_linear: bool
) -> Workspaces:
    """What a training step's matmuls keep allocated on a card of `compute_capability` (None: not
    known, taken as Hopper's, the larger) under `torch_version` (None: current behaviour)."""
    version = torch_version or LT_SHARED_FROM
    if compute_capability is None:
        per_thread, card = HOPPER_WORKSPACE_BYTES, "32 MiB (card not known: Hopper's; 8.1 MiB on Ampere)"
    elif compute_capability == (9, 0) or (compute_capability[0] in (10, 12) and version >= BLACKWELL_32MIB_FROM):
        per_thread, card = HOPPER_WORKSPACE_BYTES, f"32 MiB on sm_{compute_capability[0]}{compute_capability[1]}"
    else:
        per_thread, card = OTHER_WORKSPACE_BYTES, f"8.1 MiB on sm_{compute_capability[0]}{compute_capability[1]}"
    total = MATMUL_THREADS * per_thread
    formula = f"{MATMUL_THREADS} threads (forward, autograd) × cuBLAS workspace {card}"
    if biased_linear and LT_KEPT_FROM <= version < LT_SHARED_FROM:
        total += LT_WORKSPACE_BYTES
        formula += " + 1 MiB cuBLASLt workspace kept by the forward's biased linears (torch 2.9-2.11)"
    return Workspaces(total, formula)
