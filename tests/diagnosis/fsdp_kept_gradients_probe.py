"""Run by test_fsdp_kept_gradients.py in a subprocess: two CPU ranks (gloo) train a stack of
LoRA-style blocks under torch FSDP1 (frozen blocks and adapters wrapped apart, as peft's
fsdp_auto_wrap_policy does) with torch.utils.checkpoint, and count, when layer 0 is recomputed in
backward, how many other layers' checkpoint inputs still hold a gradient.

    python fsdp_kept_gradients_probe.py OUT_JSON LAYERS CASES

CASES is a comma-separated list of REENTRANT:FSDP pairs (each 0 or 1), e.g. "1:1,0:1,1:0": one
process group runs them all (starting two ranks is most of the probe's time).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy
from torch.utils.checkpoint import checkpoint

HIDDEN, RANK, BATCH, TOKENS = 32, 4, 2, 8


class Adapted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(HIDDEN, HIDDEN, bias=False).requires_grad_(False)
        self.lora_a = nn.Linear(HIDDEN, RANK, bias=False)
        self.lora_b = nn.Linear(RANK, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


class Block(nn.Module):
    """Records, when it runs with grad (the recomputation), which layers' inputs hold a .grad."""

    def __init__(self, index: int, seen: list, report: list) -> None:
        super().__init__()
        self.index, self.seen, self.report = index, seen, report
        self.norm = nn.LayerNorm(HIDDEN).requires_grad_(False)
        self.proj = Adapted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.is_leaf:  # the checkpoint's detached input, recomputing
            alive = [ref() for ref in self.seen]
            self.report.append((self.index, sum(t is not None and t.grad is not None for t in alive)))
            self.seen.append(weakref.ref(x))
        return x + torch.relu(self.proj(self.norm(x)))


class Stack(nn.Module):
    def __init__(self, layers: int, reentrant: bool, seen: list, report: list) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.embed = nn.Embedding(50, HIDDEN).requires_grad_(False)
        self.layers = nn.ModuleList(Block(i, seen, report) for i in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).requires_grad_(True)  # what enable_input_require_grads does
        for layer in self.layers:
            h = checkpoint(layer, h, use_reentrant=self.reentrant)
        return h.square().mean()


def _trainable_leaf(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return not list(module.children()) and weight is not None and weight.requires_grad


def _kept_at_layer0(layers: int, reentrant: bool, fsdp: bool) -> int:
    torch.manual_seed(0)
    seen: list = []
    report: list = []
    policy = functools.partial(
        _or_policy,
        policies=[
            functools.partial(lambda_auto_wrap_policy, lambda_fn=_trainable_leaf),
            functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block}),
        ],
    )
    model = Stack(layers, reentrant, seen, report)
    if fsdp:
        model = FullyShardedDataParallel(
            model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu")
        )
    ids = torch.randint(0, 50, (BATCH, TOKENS))
    for _ in range(2):  # the second step is the steady state
        seen.clear()
        report.clear()
        model(ids).backward()
    return [kept for index, kept in report if index == 0][-1]


def worker(rank: int, port: int, out: str, layers: int, cases: list[tuple[bool, bool]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    kept = {f"{int(reentrant)}:{int(fsdp)}": _kept_at_layer0(layers, reentrant, fsdp) for reentrant, fsdp in cases}
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"kept_at_layer0": kept, "torch": torch.__version__}, handle)
    dist.destroy_process_group()


def main() -> None:
    out, layers = sys.argv[1], int(sys.argv[2])
    cases = [(pair.split(":")[0] == "1", pair.split(":")[1] == "1") for pair in sys.argv[3].split(",")]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(port, out, layers, cases), nprocs=2)


if __name__ == "__main__":
    main()
