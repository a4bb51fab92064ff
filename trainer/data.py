"""Token batches for training: synthetic ids, or a local .txt / .jsonl file tokenised.

Batches are plain LongTensors (batch, seq) with no padding: with `vary_length` each micro-batch
gets its own length, which is how real packed or bucketed data stresses the caching allocator.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from trainer.config import DataConfig


class DataSetupError(RuntimeError):
    """The data source exists but cannot give a single batch."""


def _min_length(cfg: DataConfig) -> int:
    return cfg.min_seq_len if cfg.min_seq_len is not None else max(2, cfg.seq_len // 4)


def _read_text(path: Path, text_field: str) -> str:
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8", errors="replace")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataSetupError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataSetupError(f"{path}:{number}: no string field {text_field!r} (data.text_field)")
        texts.append(record[text_field])
    return "\n".join(texts)


def _tokenize(text: str, vocab_size: int, tokenizer_path: str | None) -> torch.Tensor:
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    # Byte-level: every model with >= 256 ids can read bytes directly; smaller ones wrap.
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab_size


def batches(
    cfg: DataConfig, micro_batch_size: int, vocab_size: int, seed: int, tokenizer_path: str | None = None
) -> Iterator[torch.Tensor]:
    """An endless stream of (micro_batch_size, length) token batches on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    low = _min_length(cfg)

    def length() -> int:
        if not cfg.vary_length:
            return cfg.seq_len
        return int(torch.randint(low, cfg.seq_len + 1, (1,), generator=generator))

    if cfg.source == "synthetic":
        while True:
            yield torch.randint(0, vocab_size, (micro_batch_size, length()), generator=generator)

    path = Path(cfg.source).expanduser()
    tokens = _tokenize(_read_text(path, cfg.text_field), vocab_size, tokenizer_path)
    if tokens.numel() < cfg.seq_len:
        raise DataSetupError(
            f"{path} gives {tokens.numel()} tokens; data.seq_len {cfg.seq_len} needs at least that many"
        )
    windows = tokens[: tokens.numel() // cfg.seq_len * cfg.seq_len].view(-1, cfg.seq_len)
    while True:
        order = torch.randperm(windows.shape[0], generator=generator)
        for start in range(0, len(order), micro_batch_size):
            # Indices wrap around, so a short file still fills every batch.
            rows = order[torch.arange(start, start + micro_batch_size) % len(order)]
            yield windows[rows, : length()]
