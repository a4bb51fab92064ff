"""The training loop: setup → train. Reads top to bottom; the collector watches from the side.

CPU/GPU and precision differences live in objects that do nothing when unused (`autocast` with
`enabled=False`, `GradScaler(enabled=False)`), not in branches inside the loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from collector.monitor import StepMonitor
from trainer.config import RunConfig, TrainConfig
from trainer.data import batches
from trainer.models import BuiltModel, build_model

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class DeviceSetupError(RuntimeError):
    """train.device names a device this machine does not have."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceSetupError(f"train.device {name!r}: CUDA is not available on this machine")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceSetupError(f"train.device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return device


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class Training:
    """Everything the loop needs, built once."""

    cfg: RunConfig
    device: torch.device
    built: BuiltModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: Iterator[torch.Tensor]

    def autocast(self) -> torch.autocast:
        mixed = self.cfg.train.mixed_precision
        return torch.autocast(
            self.device.type, dtype=_AUTOCAST_DTYPES.get(mixed, torch.bfloat16), enabled=mixed != "no"
        )


def setup(cfg: RunConfig, device: torch.device) -> Training:
    torch.manual_seed(cfg.train.seed)
    built = build_model(cfg.model, cfg.lora, device)
    return Training(
        cfg=cfg,
        device=device,
        built=built,
        optimizer=make_optimizer(cfg.train, built.model),
        # Loss scaling exists for fp16's narrow range only; bf16 and fp32 need none.
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.mixed_precision == "fp16"),
        batches=batches(
            cfg.data, cfg.train.micro_batch_size, built.vocab_size, cfg.train.seed, built.tokenizer_path
        ),
    )


def train(training: Training, monitor: StepMonitor, first_step: int = 1) -> None:
    """Run `train.max_steps` optimizer steps of `grad_accum_steps` micro-batches each, numbered
    from `first_step`."""
    cfg, model = training.cfg, training.built.model
    accum = cfg.train.grad_accum_steps
    for step in range(first_step, first_step + cfg.train.max_steps):
        monitor.begin_step()
        tokens, seq_len, step_loss = 0, 0, None
        for _ in range(accum):
            input_ids = next(training.batches).to(training.device, non_blocking=True)  # (batch, seq)
            tokens += input_ids.numel()
            seq_len = max(seq_len, input_ids.shape[1])
            with training.autocast(), monitor.forward():
                loss = model(input_ids=input_ids, labels=input_ids).loss / accum
            training.scaler.scale(loss).backward()
            # Summed on the device: no host sync inside the step.
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        monitor.after_backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        training.optimizer.zero_grad(set_to_none=True)
        monitor.end_step(step, step_loss, tokens, seq_len)
