"""bench.estimator_error reads our own GPU recordings as points: the layout bench/gpu_record.py
writes, built here in a temporary folder (a loader test, not a recording)."""

from __future__ import annotations

import json

from bench.estimator_error import recorded_points
from trainer.config import validate_config


def test_each_measured_config_becomes_an_allocated_and_a_reserved_point(tmp_path):
    folder = tmp_path / "torch-x-gpu"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"torch": "2.11.0", "gpu": "Some GPU"}))
    config = validate_config({"model": {"name": "llama-3.2-1b", "dtype": "bf16"}, "train": {"device": "cuda"}})
    rows = [
        {"name": "big", "config": config.to_dict(), "measured": {"peak_allocated_bytes": 3 * 2**30,
                                                                 "peak_reserved_bytes": 4 * 2**30}},
        {"name": "tiny", "config": config.to_dict(), "measured": {"peak_allocated_bytes": 2**20,
                                                                  "peak_reserved_bytes": 2**21}},
        {"name": "failed", "config": config.to_dict(), "measured": {"error": "CUDA out of memory"}},
    ]  # fmt: skip
    (folder / "peaks.json").write_text(json.dumps(rows))
    points = {point.id: point for point in recorded_points(tmp_path)}
    assert set(points) == {"gpu-big-allocated", "gpu-big-reserved", "gpu-tiny-allocated", "gpu-tiny-reserved"}
    assert points["gpu-big-reserved"].metric == "peak_reserved" and points["gpu-big-reserved"].bytes == 4 * 2**30
    # Every measured step is summarised (the cuBLAS workspaces that dominate a tiny step are modelled);
    # a tiny step's reserve comes with the reason the reserve model does not reach it.
    assert not any(point.exclude_reason for point in points.values())
    assert points["gpu-tiny-reserved"].expected_gap and not points["gpu-tiny-allocated"].expected_gap
    assert not points["gpu-big-reserved"].expected_gap
    assert points["gpu-big-allocated"].gpu == "Some GPU" and "torch 2.11.0" in points["gpu-big-allocated"].source
    assert points["gpu-big-allocated"].versions == {"torch": "2.11.0"}  # the estimate follows the torch that ran
    assert validate_config(points["gpu-big-allocated"].config) == config


def test_no_recording_means_no_points(tmp_path):
    assert recorded_points(tmp_path) == []


def test_every_published_point_restates_as_a_valid_config(tmp_path):
    """A typo in bench/published_measurements.yaml would otherwise surface only in a bench run as an
    error row. The points the table shows as refused are refused by the estimators, not here."""
    from bench.estimator_error import build_config, load_points

    points, model_configs = load_points()
    assert len({point.id for point in points}) == len(points) and len(points) >= 50
    for point in points:
        cfg = build_config(point, model_configs, tmp_path)
        assert cfg.model.name, point.id


def test_a_point_that_peaks_on_its_first_micro_batch_says_why(tmp_path):
    """`peak_micro_batch: first` changes what is estimated, so a point must give its reason."""
    import pytest
    import yaml

    from bench.estimator_error import load_points

    point = {"id": "p", "source": "s", "metric": "peak_allocated", "bytes": 1, "peak_micro_batch": "first"}
    path = tmp_path / "points.yaml"
    path.write_text(yaml.safe_dump({"points": [point]}))
    with pytest.raises(ValueError, match="needs an assumption"):
        load_points(path)
    path.write_text(yaml.safe_dump({"points": [dict(point, assumptions=["first micro-batch: the longest first"])]}))
    assert load_points(path)[0][0].first_micro_batch
    path.write_text(yaml.safe_dump({"points": [dict(point, peak_micro_batch="last")]}))
    with pytest.raises(ValueError, match="'first' or 'steady'"):
        load_points(path)
