"""The dashboard's view models, without Streamlit."""

from __future__ import annotations

import pytest

from app.actions import _is_worker_of
from app.charts import byte_unit, markers_frame
from app.views.facts import human_duration
from db.queries import StepEvent, StepRecord
from diagnosis.units import GIB, MIB


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "n/a"),
        (0, "0 s"),
        (44.6, "45 s"),
        (725, "12 min 05 s"),
        (3 * 3600 + 125, "3 h 02 min"),
        (2 * 86_400 + 4 * 3600 + 59, "2 d 4 h"),
    ],
)
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


@pytest.mark.parametrize(
    ("largest", "unit"), [(None, "MiB"), (5 * MIB, "MiB"), (GIB - 1, "MiB"), (GIB, "GiB"), (80 * GIB, "GiB")]
)
def test_byte_axes_are_in_mib_or_gib(largest, unit):
    assert byte_unit(largest).name == unit


def test_markers_name_the_event_and_its_step():
    record = StepRecord(**{name: None for name in StepRecord.__dataclass_fields__} | {"step": 12})
    frame = markers_frame([StepEvent("alloc_retry", 3, record)], None)
    assert frame.to_dict("records") == [{"step": 12, "kind": "alloc_retry", "what": "3 allocator retries at step 12"}]


@pytest.mark.parametrize(
    ("cmdline", "is_worker"),
    [
        (["python", "-m", "trainer", "_worker", "--run-id", "7", "--db", "sqlite://"], True),
        (["python", "-m", "trainer", "_worker", "--run-id", "70", "--db", "sqlite://"], False),
        (["python", "-m", "trainer", "run", "--run-id", "7"], False),
        (["python", "-m", "trainer", "_worker", "--run-id"], False),
        (["sleep", "100"], False),
    ],
)
def test_only_the_runs_own_worker_is_signalled(cmdline, is_worker):
    assert _is_worker_of(cmdline, 7) is is_worker


def _postmortem(nvml):
    import dataclasses

    from tests.app.test_compare_view import postmortem

    return dataclasses.replace(postmortem(1), nvml=nvml)


def test_the_gpu_line_splits_the_card_into_this_process_and_the_others():
    from app.views.postmortem import gpu_line

    line = gpu_line(
        _postmortem(
            {"available": True, "taken": "at the failing allocation", "memory_used_bytes": 79 * GIB,
             "memory_total_bytes": 80 * GIB, "process_used_bytes": 71 * GIB}
        )
    )  # fmt: skip
    assert line.startswith("**GPU at the failure** (NVML, at the failing allocation)")
    assert "79.0 GiB of 80.0 GiB in use" in line and "71.0 GiB by this process" in line
    assert "8.0 GiB by others" in line
    assert gpu_line(_postmortem({"available": False, "reason": "the run is on the CPU"})).endswith(
        "the run is on the CPU."
    )
    assert gpu_line(_postmortem(None)) is None  # a post-mortem from before the field existed


def test_the_terminal_post_mortem_says_what_the_dashboard_says_about_the_card():
    from app.views.postmortem import gpu_line
    from trainer.report import postmortem_report

    reading = {"available": True, "taken": "after the failure", "memory_used_bytes": 30 * GIB,
               "memory_total_bytes": 40 * GIB, "process_used_bytes": 20 * GIB}  # fmt: skip
    shared = "30.0 GiB of 40.0 GiB in use, 20.0 GiB by this process, 10.0 GiB by others"
    assert shared in gpu_line(_postmortem(reading))
    assert f"GPU at the failure (NVML, after the failure): {shared}" in postmortem_report(_postmortem(reading))
    missing = postmortem_report(_postmortem({"available": False, "reason": "no NVML on this machine"}))
    assert "GPU (NVML): no reading (no NVML on this machine)" in missing
    assert "NVML" not in postmortem_report(_postmortem(None))


def test_a_failure_in_the_loss_reads_as_the_loss_and_the_request_is_named_in_both_views():
    import dataclasses

    from app.views.postmortem import where
    from collector.readings import LOSS_MODULE
    from trainer.report import postmortem_report

    pm = dataclasses.replace(_postmortem(None), module=LOSS_MODULE, module_stack=(LOSS_MODULE,))
    assert where(pm).startswith("**Layer:** the loss, after the LM head")
    request = "The failed 500.0 MiB request is 4 × 1,024 × 32,000 × 4 B (batch, tokens, vocab; fp32): the logits."
    report = postmortem_report(pm, (), request)
    assert f"of {LOSS_MODULE}" in report.splitlines()[0] and f"  {request}" in report.splitlines()
    assert "request is" not in postmortem_report(pm)
