"""The fit solver ("the longest seq_len that fits in C bytes", issue #4) against the longest
contexts other people found to fit: Unsloth's "Hugging Face + FA2" max-context tables (source E of
bench/published_measurements.yaml), where each row is a VRAM size and the longest padded sequence
that trained in it.

estimator_error scores the estimate's peak at the published length against the VRAM; this asks
the question a user asks Plan instead: given the card, which length does oomlens say fits, and how
far is that from the length that did? The solver judges on the device level (the CUDA context on
top of the reserve), as Plan does, while the published VRAM is read as the reserve
(see the points' assumptions), so the solver is expected to answer a little short.

    .venv/bin/python -m bench.max_context
"""

from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.estimator_error import build_config, load_points
from diagnosis.analytic import estimate_analytic
from diagnosis.fit import largest_fitting
from trainer.config import RunConfig

PREFIX = "unsloth-hf-fa2-"
# The tables' rows without a length: HF + FA2 did not fit at any length. (id of the model's
# points, VRAM in GiB, the quote.)
OUT_OF_MEMORY = (
    ("llama3.1-8b", 8, "Llama 3.1 (8B) max. context length, GPU VRAM 8 GB, Hugging Face + FA2: OOM"),
    ("llama3.3-70b", 48, "Llama 3.3 (70B) max. context length, GPU VRAM 48 GB, Hugging Face+FA2: OOM"),
)


@dataclass(frozen=True)
class Answer:
    model: str
    vram_gib: int
    published: int | None  # None: the table says OOM
    solved: int | None  # None: nothing fits
    note: str


def _estimator(point):
    def estimate(cfg: RunConfig):
        return estimate_analytic(cfg, device="cuda", gpu=point.gpu or None, **point.estimate_versions)

    return estimate


def answers() -> list[Answer]:
    points, model_configs = load_points()
    mine = [point for point in points if point.id.startswith(PREFIX)]
    out = []
    with tempfile.TemporaryDirectory(prefix="oomlens-max-context-") as tmp:
        by_model = {}
        for point in mine:
            model = re.match(rf"{PREFIX}(.+)-qlora-\d+gb$", point.id).group(1)
            cfg = build_config(point, model_configs, Path(tmp))
            by_model[model] = (cfg, point)
            result = largest_fitting(cfg, point.bytes, "data.seq_len", _estimator(point))
            out.append(Answer(model, point.bytes // 2**30, cfg.data.seq_len, result.value, result.reason))
        for model, vram, _ in OUT_OF_MEMORY:
            cfg, point = by_model[model]
            result = largest_fitting(cfg, vram * 2**30, "data.seq_len", _estimator(point))
            out.append(Answer(model, vram, None, result.value, result.reason))
    return sorted(out, key=lambda answer: (answer.model, answer.vram_gib))


def table(rows: list[Answer]) -> str:
    lines = [
        "| model | VRAM (GiB) | HF + FA2, published | oomlens fit solver | difference |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        published = f"{row.published:,}" if row.published is not None else "OOM"
        solved = f"{row.solved:,}" if row.solved is not None else "OOM"
        if row.published is not None and row.solved is not None:
            difference = f"{row.solved - row.published:+,} tokens ({(row.solved - row.published) / row.published:+.1%})"
        elif row.published is None and row.solved is None:
            difference = f"agrees ({row.note})"
        else:
            difference = f"disagrees ({row.note})"
        lines.append(f"| {row.model} | {row.vram_gib} | {published} | {solved} | {difference} |")
    return "\n".join(lines)


def main() -> int:
    print(table(answers()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
