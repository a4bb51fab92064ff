"""How much precision the chunked loss costs a pure-bf16 full fine-tune (train.loss_chunk_tokens).

With bf16 weights the LM head's weight gradient is a bf16 tensor either way. transformers' loss
makes it in one matmul over every token (accumulated in fp32 inside the kernel, rounded once);
the chunked loss adds one chunk's product at a time (rounded once per chunk), as Liger-Kernel's
fused linear cross-entropy does. This measures the cost against an fp32 reference of the same
weights and tokens: the relative L2 error of the head's weight gradient, unchunked and chunked.

    .venv/bin/python -m bench.chunked_loss_precision
"""

from __future__ import annotations

import sys

import torch
import transformers

from trainer.chunked_loss import causal_lm_loss

TOKENS = (4, 1024)
VOCAB = 32_000


def _model() -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config).eval()  # eval: no dropout, the same step each time


def _head_gradient(model: torch.nn.Module, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    causal_lm_loss(model, ids, chunk).backward()
    return model.lm_head.weight.grad.float().clone()


def relative_errors(chunks: tuple[int, ...] = (1024, 256, 64), seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    reference = _model()
    ids = torch.randint(0, VOCAB, TOKENS)
    exact = _head_gradient(reference, ids, 0)
    low = _model()
    low.load_state_dict(reference.state_dict())
    low = low.to(torch.bfloat16)

    def error(gradient: torch.Tensor) -> float:
        return ((gradient - exact).norm() / exact.norm()).item()

    tokens = TOKENS[0] * TOKENS[1]
    result = {"bf16, transformers' loss": error(_head_gradient(low, ids, 0))}
    for chunk in chunks:
        label = f"bf16, {chunk}-token chunks ({tokens // chunk} per micro-batch)"
        result[label] = error(_head_gradient(low, ids, chunk))
    result[f"fp32, {chunks[1]}-token chunks"] = error(_head_gradient(reference, ids, chunks[1]))
    return result


def main() -> int:
    print(f"LM head weight gradient, relative L2 error against fp32 unchunked ({TOKENS[0]} × {TOKENS[1]} tokens)")
    print("| loss | error |\n|---|---|")
    for label, value in relative_errors().items():
        print(f"| {label} | {value:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
