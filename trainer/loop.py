"""The training loop: setup → train. Reads top to bottom; the collector watches from the side.

CPU/GPU and precision differences live in objects that do nothing when unused (`autocast` with
`enabled=False`, `GradScaler(enabled=False)`), not in branches inside the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from collector.monitor import StepMonitor
from trainer.chunked_loss import causal_lm_loss, check_same_loss
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


_BITSANDBYTES_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw": "PagedAdamW",
}


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate like the other optimizers; Adafactor's relative step would ignore train.lr.
        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=False, relative_step=False)
    if cfg.optimizer in _BITSANDBYTES_OPTIMIZERS:
        import bitsandbytes  # refused before launch where it is missing (trainer.config.runner_issues)

        optimizer_class = getattr(bitsandbytes.optim, _BITSANDBYTES_OPTIMIZERS[cfg.optimizer])
        return optimizer_class(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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

    leaked: list[torch.Tensor] = field(default_factory=list)

    def leak_step(self) -> None:
        """`debug.leak_mb_per_step`: keep a tensor alive per step, the way a real leak does
        (a loss appended to a list without .item(), a cache that never evicts)."""
        leak = self.cfg.debug.leak_mb_per_step
        if leak > 0:
            self.leaked.append(torch.ones(int(leak * 1024**2) // 4, device=self.device))

    def autocast(self) -> torch.autocast:
        mixed = self.cfg.train.mixed_precision
        return torch.autocast(
            self.device.type, dtype=_AUTOCAST_DTYPES.get(mixed, torch.bfloat16), enabled=mixed != "no"
        )


def setup(cfg: RunConfig, device: torch.device) -> Training:
    torch.manual_seed(cfg.train.seed)
    built = build_model(cfg.model, cfg.lora, device)
    if cfg.train.loss_chunk_tokens:
        probe = torch.randint(0, built.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        check_same_loss(built.model, probe.to(device), cfg.train.loss_chunk_tokens)
    return Training(
        cfg=cfg,
        device=device,
        built=built,
        optimizer=make_optimizer(cfg.train, built.model),
        # Loss scaling exists for fp16's narrow range only; bf16 and fp32 need none.
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.mixed_precision == "fp16"),
        batches=batches(cfg.data, cfg.train.micro_batch_size, built.vocab_size, cfg.train.seed, built.tokenizer_path),
    )


def make_monitor(cfg: RunConfig, training: Training, publish: Callable[[object], object]) -> StepMonitor:
    """The collector as the config asks for it (the worker and the benchmarks share this)."""
    return StepMonitor(
        training.built.model,
        training.optimizer,
        training.device,
        publish,
        track_activations=cfg.monitor.track_activations,
        track_modules=cfg.monitor.track_modules,
        layer_profile_steps=cfg.monitor.layer_profile_steps,
        layer_profile_every=cfg.monitor.layer_profile_every,
        activation_recount_every=cfg.monitor.activation_recount_every,
    )


def train(training: Training, monitor: StepMonitor, first_step: int = 1) -> None:
    """Run `train.max_steps` optimizer steps of `grad_accum_steps` micro-batches each, numbered
    from `first_step`."""
    cfg, model = training.cfg, training.built.model
    accum = cfg.train.grad_accum_steps
    for step in range(first_step, first_step + cfg.train.max_steps):
        monitor.begin_step(step)
        tokens, seq_len, step_loss = 0, 0, None
        for micro_batch in range(accum):
            monitor.enter("data", micro_batch)
            input_ids = next(training.batches).to(training.device, non_blocking=True)  # (batch, seq)
            monitor.set_batch(*input_ids.shape)
            tokens += input_ids.numel()
            seq_len = max(seq_len, input_ids.shape[1])
            with training.autocast(), monitor.forward():
                loss = causal_lm_loss(model, input_ids, cfg.train.loss_chunk_tokens) / accum
            monitor.enter("backward")
            training.scaler.scale(loss).backward()
            # Summed on the device: no host sync inside the step.
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            # Unbound now, the graph goes with it: left bound to the next assignment it would live through
            # the next forward and the optimizer step, with what bitsandbytes' int8 matmuls (and 4-bit ones
            # before 0.43.2) keep on their ctx (diagnosis.analytic.SRC_LITGPT_LOOP: litgpt's loop does that).
            del loss
        monitor.after_backward()
        monitor.enter("optimizer")
        training.scaler.step(training.optimizer)
        training.scaler.update()
        training.optimizer.zero_grad(set_to_none=True)
        training.leak_step()
        monitor.end_step(step, step_loss, tokens, seq_len)
