"""The measured error a screen quotes is the bench's: the committed summary agrees with RESULTS.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

from diagnosis.accuracy import measured_error, trust_text

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"


def _results_rows() -> dict[str, tuple[int, float, float]]:
    """The analytic rows of the published-measurements summary table in bench/RESULTS.md."""
    rows = {}
    for line in RESULTS.read_text().splitlines():
        match = re.match(r"\| analytic \| ([^|]+) \| (\d+) \| ([\d.]+)% \| ([\d.]+)% \|", line)
        if match:
            rows[match[1].strip()] = (int(match[2]), float(match[3]), float(match[4]))
    return rows


def test_the_committed_summary_is_the_one_in_results():
    """`bench.estimator_error --write` writes both; a summary left behind by a partial edit fails here."""
    measured = measured_error()
    assert measured is not None and measured.by_label
    table = _results_rows()
    for label, summary in measured.by_label.items():
        count, median, p90 = table[label]
        assert summary.count == count, label
        # The table prints one decimal of the unrounded figure; the JSON keeps two (3.2538 -> "3.3%" and 3.25).
        assert abs(summary.median_abs_pct - median) <= 0.05 + 1e-9, label
        assert abs(summary.p90_abs_pct - p90) <= 0.05 + 1e-9, label


def test_the_text_quotes_the_transformers_stack_and_what_differs(tmp_path):
    document = {
        "measured": "2026-01-01",
        "details": "bench/RESULTS.md",
        "analytic": [
            {"label": "peak_allocated, stack hf-trainer", "count": 17, "median_abs_pct": 1.04, "p90_abs_pct": 3.31},
            {"label": "nvidia_smi", "count": 6, "median_abs_pct": 7.87, "p90_abs_pct": 12.77},
            {"label": "peak_allocated, stack litgpt", "count": 19, "median_abs_pct": 9.43, "p90_abs_pct": 40.64},
        ],
    }
    path = tmp_path / "measured_error.json"
    path.write_text(json.dumps(document))
    text = trust_text(measured_error(path))
    assert "transformers + PEFT runs within 1.0% median, 3.3% p90, 17 runs" in text
    assert "nvidia-smi showed within 7.9% median, 12.8% p90, 6 runs" in text
    assert "litgpt's own models, estimated with model.implementation: litgpt: 9.4% median, 40.6% p90, 19 runs" in text
    assert text.endswith("Details: bench/RESULTS.md (2026-01-01).")


def test_no_summary_means_no_claim(tmp_path):
    assert measured_error(tmp_path / "missing.json") is None
    (tmp_path / "broken.json").write_text("{not json")
    assert measured_error(tmp_path / "broken.json") is None
    assert trust_text(None) is None
