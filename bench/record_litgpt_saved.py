"""Record what litgpt's own GPT + LoRA keeps for backward, on the CPU, for the analytic estimator's
litgpt walk (model.implementation: litgpt) to be tested against without litgpt installed.

litgpt is not a dependency of oomlens; install it beside the venv, without touching its torch:

    .venv/bin/pip install --target /tmp/litgpt-pkgs --no-deps litgpt==0.5.3 lightning lightning-utilities \\
        torchmetrics jsonargparse
    PYTHONPATH=/tmp/litgpt-pkgs .venv/bin/python -m bench.record_litgpt_saved

It builds tiny configs of litgpt's Llama and Phi families with random bf16 weights, runs the forward and
loss of litgpt's finetune/lora.py (128-token head chunks, chunked cross-entropy) under saved-tensor
hooks, and writes the bytes of the distinct storages kept (parameters and buffers excluded) to
tests/fixtures/litgpt/saved_bytes.json, with the versions that produced them.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "litgpt" / "saved_bytes.json"
TINY = {
    "Llama-2-7b-hf": dict(n_layer=2, n_embd=256, n_head=4, intermediate_size=688),
    "Llama-3-8B": dict(n_layer=2, n_embd=256, n_head=8, n_query_groups=2, intermediate_size=896),
    "phi-1_5": dict(n_layer=2, n_embd=256, n_head=4, intermediate_size=1024),
    "gemma-2b": dict(n_layer=2, n_embd=256, n_head=4, n_query_groups=1, head_size=64, intermediate_size=1024),
}
FAMILY = {"Llama-2-7b-hf": "llama", "Llama-3-8B": "llama", "phi-1_5": "phi", "gemma-2b": "gemma"}
# litgpt's flags, and the same adapters in the HF module names oomlens' configs use.
TARGETS = {
    "q_v": (
        dict(lora_query=True, lora_value=True),
        {"llama": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"]},
    ),
    "all": (
        dict(lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True),
        {
            "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
            "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
    ),
    # Full fine-tuning: finetune/full.py, one logits tensor and chunked cross-entropy over it.
    "full": (None, {"llama": None, "phi": None, "gemma": None}),
}
VOCAB, BATCH, SEQ, RANK = 1024, 2, 256, 8


def saved_bytes(name: str, flags: dict[str, bool] | None) -> tuple[Any, int]:
    """Bytes kept for backward by one forward and loss of litgpt's LoRA script, or of its full
    fine-tuning script when `flags` is None."""
    import litgpt.lora as lora
    import litgpt.model as plain
    from litgpt.utils import chunked_cross_entropy

    torch.manual_seed(0)
    sizes = dict(TINY[name], padded_vocab_size=VOCAB, vocab_size=VOCAB)
    if flags is None:
        cfg = plain.Config.from_name(name, **sizes)
    else:
        options = dict(lora_query=False, lora_key=False, lora_value=False, lora_projection=False, lora_mlp=False)
        cfg = lora.Config.from_name(
            name, **sizes, lora_r=RANK, lora_alpha=16, lora_dropout=0.05, lora_head=False, **(options | flags)
        )
    torch.set_default_dtype(torch.bfloat16)  # what Fabric's bf16-true does while the model is built
    try:
        model = plain.GPT(cfg) if flags is None else lora.GPT(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    if flags is not None:
        lora.mark_only_lora_as_trainable(model)
    model.train()
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if flags is None:
            chunked_cross_entropy(model(tokens)[..., :-1, :], tokens[..., 1:])
        else:
            logits = model(tokens, lm_head_chunk_size=128)
            logits[-1] = logits[-1][..., :-1, :]
            chunked_cross_entropy(logits, tokens[..., 1:])
    return cfg, sum(kept.values())


def main() -> int:
    from importlib.metadata import version

    rows = []
    for name in TINY:
        family = FAMILY[name]
        for targets, (flags, hf_names) in TARGETS.items():
            cfg, kept = saved_bytes(name, flags)
            rows.append(
                dict(
                    litgpt_name=name,
                    targets=targets,
                    hf_target_modules=hf_names[family],
                    batch=BATCH,
                    seq_len=SEQ,
                    lora_r=RANK,
                    saved_bytes=kept,
                    n_layer=cfg.n_layer,
                    n_embd=cfg.n_embd,
                    n_head=cfg.n_head,
                    n_query_groups=cfg.n_query_groups,
                    intermediate_size=cfg.intermediate_size,
                    vocab_size=cfg.padded_vocab_size,
                    rotary_percentage=cfg.rotary_percentage,
                    head_size=cfg.head_size,
                    family=family,
                )
            )
            print(f"{name} {targets}: {kept:,} B")
    document = {
        "recorded_with": {
            "litgpt": version("litgpt"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": "cpu",
            "dtype": "bf16 weights (bf16-true)",
        },
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
