"""The causal-LM loss without the whole batch's logits: `train.loss_chunk_tokens`.

transformers' loss (loss_utils.ForCausalLMLoss) holds b·s·V logits, their fp32 copy and the fp32
log-softmax kept for backward: 10 bytes per token per vocabulary entry in bf16, 7.5 GiB for one
4,096-token sequence of Qwen2.5 (V = 152,064), more than the activations of a checkpointed 7B.
Here the LM head and the cross-entropy run `chunk` tokens at a time, and each chunk's gradients
(the head's input, and the head's weight and bias when they train) are made right there, in the
forward, as Liger-Kernel's fused linear cross-entropy and Unsloth do. The chunk's logits are then
dropped: no b·s·V tensor ever exists, and backward only scales the gradients already made.

It replaces `model(input_ids=…, labels=…).loss` for decoders whose causal-LM forward is the
decoder, then the head (then Gemma 2's soft-cap). `check_same_loss` proves that on the model
itself before training starts, so a checkpoint that does more (a logit scale, a second head) is
refused rather than trained on a different loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.models import ModelSetupError

IGNORE_INDEX = -100
# Agreement asked of the chunked loss with the model's own on the same input, in eval mode.
_LOSS_TOLERANCE = 1e-3


class ChunkedLossError(ModelSetupError):
    """The model's causal-LM loss is not the decoder, the head and a cross-entropy."""


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM under a peft wrapper (LoRA lives inside its modules)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    causal = _causal_lm(model)
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ChunkedLossError(
            f"train.loss_chunk_tokens: {type(causal).__name__} has no linear LM head "
            f"({type(head).__name__}); set train.loss_chunk_tokens: 0"
        )
    decoder = causal.get_decoder()
    if decoder is causal:
        raise ChunkedLossError(f"train.loss_chunk_tokens: cannot find the decoder inside {type(causal).__name__}")
    softcap = getattr(causal.config, "final_logit_softcapping", None)
    return decoder, head, float(softcap) if softcap else None


def shifted_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Each position's next token; the last position has none (ignored), as ForCausalLMLoss pads."""
    return F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)


def _loss_and_logit_gradient(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of one chunk and its gradient by the logits, written out rather than
    through autograd so the chunk's one fp32 c·V tensor is overwritten in place from scores to
    softmax to gradient (torch.logsumexp would allocate another, log_softmax/nll_loss three)."""
    scores = logits.float()  # a copy for 16-bit logits, the chunk's own logits otherwise: ours to overwrite
    del logits
    squashed = None
    if softcap:  # Gemma 2: softcap·tanh(logits / softcap)
        squashed = scores.div_(softcap).tanh_()
        scores = squashed * softcap
    valid = targets != IGNORE_INDEX
    index = targets.clamp_min(0).unsqueeze(1)
    picked = scores.gather(1, index).squeeze(1)
    top = scores.amax(dim=-1, keepdim=True)
    exp = scores.sub_(top).exp_()
    total = exp.sum(dim=-1, keepdim=True)
    loss = ((total.log() + top - picked.unsqueeze(1)).squeeze(1) * valid).sum()
    grad = exp.div_(total)  # softmax
    grad.scatter_add_(1, index, -valid.unsqueeze(1).to(grad.dtype))  # minus one at each target
    grad.mul_(valid.unsqueeze(1))
    if squashed is not None:
        grad.mul_(squashed.square_().neg_().add_(1))  # d tanh = 1 − tanh²
    return loss, grad


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `head(hidden)` against `labels`, its gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, softcap: float | None):  # noqa: ANN001
        rows = hidden.reshape(-1, hidden.shape[-1])
        targets = labels.reshape(-1)
        count = (targets != IGNORE_INDEX).sum().clamp_min(1)  # a tensor: no host sync
        grad_hidden = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device = hidden.device.type
        # Under autocast the head runs in the autocast dtype, as transformers' lm_head would: one
        # copy of the weight for the whole loop rather than one per chunk.
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        low_weight = weight.to(compute)
        low_bias = bias.to(compute) if bias is not None else None
        with torch.autocast(device, enabled=False):
            for start in range(0, rows.shape[0], chunk):
                part = rows[start : start + chunk].to(compute)
                loss, grad = _loss_and_logit_gradient(
                    F.linear(part, low_weight, low_bias), targets[start : start + chunk], softcap
                )
                total += loss
                grad_logits = grad.to(compute)
                del grad
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = grad_logits @ low_weight
                if grad_weight is not None and grad_weight.dtype == compute:
                    grad_weight.addmm_(grad_logits.t(), part)
                elif grad_weight is not None:
                    grad_weight += grad_logits.t() @ part  # fp32 master weights: the product in bf16, added
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
                del grad_logits
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                grad.div_(count)
        # On ctx, not save_for_backward: they are gradients made early, not activations, and the
        # collector's saved-tensor count (the runner's `activations`) should not call them so.
        ctx.gradients = (grad_hidden.view_as(hidden) if grad_hidden is not None else None, grad_weight, grad_bias)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001
        # In place: the gradients are this call's own, and a copy of the head's weight gradient
        # (V·h) would cost what the chunks saved.
        gradients, ctx.gradients = ctx.gradients, None  # backward owns them from here
        grads = [grad.mul_(grad_output.to(grad.dtype)) if grad is not None else None for grad in gradients]
        return grads[0], grads[1], grads[2], None, None, None


def decoder_output(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states the LM head reads (the decoder's final norm applied)."""
    decoder, _, _ = _parts(model)
    return decoder(input_ids=input_ids).last_hidden_state


def head_loss(model: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """The LM head and the mean next-token cross-entropy over `hidden`, `chunk_tokens` at a time."""
    _, head, softcap = _parts(model)
    return _through_head(head, hidden, shifted_labels(input_ids), chunk_tokens, softcap)


def _through_head(
    self: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, chunk: int, softcap: float | None
) -> torch.Tensor:
    """The chunked loss, in a frame whose `self` is the LM head: an out-of-memory failure inside it
    is placed "in forward of lm_head", as transformers' own loss is (collector.whereabouts names a
    failure by the `self` of its traceback's frames)."""
    return _ChunkedHeadLoss.apply(hidden, self.weight, self.bias, labels, chunk, softcap)


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """The mean next-token cross-entropy the runner trains on: transformers' own with
    `chunk_tokens` 0, else the head and loss `chunk_tokens` tokens at a time."""
    if chunk_tokens <= 0:
        return model(input_ids=input_ids, labels=input_ids).loss
    return head_loss(model, decoder_output(model, input_ids), input_ids, chunk_tokens)


def _head_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """What the chunked loss reads as logits, all at once (for the check only)."""
    _, head, softcap = _parts(model)
    logits = head(decoder_output(model, input_ids)).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def check_same_loss(model: torch.nn.Module, input_ids: torch.Tensor, chunk_tokens: int) -> None:
    """Refuse a model whose own logits or loss the chunked loss does not reproduce (a logit scale,
    a second head, a decoder output that is not the head's input). The logits are compared, not
    only the loss: random weights give near-zero logits whose loss hardly depends on a scale.
    Eval mode and no grad (dropout off, no graph), on a few tokens."""
    sample = input_ids[:1, : min(input_ids.shape[1], 16)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own_logits = model(input_ids=sample).logits.float()
            logits = _head_logits(model, sample)
            own = float(model(input_ids=sample, labels=sample).loss)
            chunked = float(causal_lm_loss(model, sample, max(1, min(chunk_tokens, 4))))
    finally:
        model.train(was_training)
    name = type(_causal_lm(model)).__name__
    scale = float(own_logits.abs().max()) or 1.0
    if own_logits.shape != logits.shape or float((own_logits - logits).abs().max()) > _LOSS_TOLERANCE * scale:
        raise ChunkedLossError(
            f"train.loss_chunk_tokens: {name}'s logits are not its LM head applied to its decoder's output "
            "(a logit scale, a second head): the chunked loss would train on another loss; "
            "set train.loss_chunk_tokens: 0"
        )
    if not math.isclose(own, chunked, rel_tol=_LOSS_TOLERANCE, abs_tol=_LOSS_TOLERANCE):
        raise ChunkedLossError(
            f"train.loss_chunk_tokens: the chunked loss ({chunked:.4f}) differs from {name}'s own ({own:.4f}) "
            "on the same tokens: this model's loss is not a mean next-token cross-entropy; "
            "set train.loss_chunk_tokens: 0"
        )
