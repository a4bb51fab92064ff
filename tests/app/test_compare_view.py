"""Compare's view model without Streamlit: config differences as dotted keys, the figures table."""

from __future__ import annotations

import dataclasses

from app.views.compare import RunFigures, config_diff, default_selection, figures_table
from db.queries import PostmortemRecord, RunRecord, RunSummary, StepSeries
from diagnosis.units import GIB, MIB


def diff_text(before: dict, after: dict) -> list[str]:
    return [str(change) for change in config_diff(before, after)]


def test_a_changed_key_reads_as_dotted_key_before_and_after():
    before = {"model": {"name": "tiny-llama", "attn_implementation": "eager"}}
    after = {"model": {"name": "tiny-llama", "attn_implementation": "sdpa"}}
    assert diff_text(before, after) == ["model.attn_implementation: eager → sdpa"]


def test_a_key_left_out_equals_its_default():
    # The runner stores full configs, older rows and hand-written YAML do not.
    assert diff_text({"train": {"max_steps": 20}}, {}) == []
    assert diff_text({}, {"train": {"max_steps": 5}}) == ["train.max_steps: 20 → 5"]


def test_switching_lora_off_is_one_change_of_the_section():
    before = {"lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}}
    assert diff_text(before, {"lora": None}) == [
        "lora: {alpha: 16.0, dropout: 0.05, r: 8, target_modules: [q_proj, v_proj]} → null"
    ]
    assert diff_text({"lora": None}, before)[0].endswith(
        "→ {alpha: 16.0, dropout: 0.05, r: 8, target_modules: [q_proj, v_proj]}"
    )


def test_several_changes_in_key_order_and_a_stored_config_that_no_longer_validates():
    before = {"data": {"source": "/gone/train.jsonl", "seq_len": 4096}, "train": {"micro_batch_size": 2}}
    after = {"data": {"source": "/gone/train.jsonl", "seq_len": 2048}, "train": {"micro_batch_size": 1}}
    assert diff_text(before, after) == ["data.seq_len: 4096 → 2048", "train.micro_batch_size: 2 → 1"]
    assert diff_text({"memory": {"alloc_conf": None}}, {"memory": {"alloc_conf": "expandable_segments:True"}}) == [
        "memory.alloc_conf: null → expandable_segments:True"
    ]


def run(run_id: int, parent: int | None = None, status: str = "completed", name: str | None = None) -> RunRecord:
    return RunRecord(
        id=run_id,
        name=name,
        status=status,
        config={},
        environment=None,
        parent_run_id=parent,
        created_at=float(run_id),
        started_at=None,
        ended_at=None,
        heartbeat_at=None,
        pid=None,
        host=None,
        device="cuda:0",
        device_name=None,
        device_total_bytes=None,
        exit_code=None,
        signal_name=None,
        error_text=None,
        samples_dropped=0,
    )


def test_default_selection_is_a_rerun_and_its_parent_else_the_two_newest():
    runs = [run(3, parent=1), run(2), run(1)]  # newest first, as list_runs gives them
    assert default_selection(runs, 3) == [1, 3]
    assert default_selection(runs, 2) == [2]
    assert default_selection(runs, None) == [2, 3]
    assert default_selection(runs, 99) == [2, 3]


def series(step_seconds: list[float]) -> StepSeries:
    steps = tuple(range(1, len(step_seconds) + 1))
    values = tuple(step_seconds)
    return StepSeries(1, 1, steps, steps, (1,) * len(steps), {"step_seconds": values}, {"step_seconds": values})


def postmortem(run_id: int) -> PostmortemRecord:
    fields = {field.name: None for field in dataclasses.fields(PostmortemRecord)}
    return PostmortemRecord(
        **{
            **fields,
            "id": 1,
            "run_id": run_id,
            "created_at": 0.0,
            "module_stack": (),
            "recent_steps": (),
            "layer_profile": (),
            "error_type": "OutOfMemoryError",
            "error_text": "",
            "traceback": "",
            "device": "cuda:0",
            "finding": "",
            "requested_bytes": 3 * GIB,
            "allocator_stats": {"allocated_bytes.all.peak": 70 * GIB, "reserved_bytes.all.peak": 78 * GIB},
        }
    )


def test_figures_table_puts_each_run_in_a_column_and_the_difference_after():
    oom = RunFigures(
        run(1, status="oom"), RunSummary(1, 4, 4, 0.0, 60 * GIB, 64 * GIB, None), postmortem(1), series([1.0, 1.2, 1.1])
    )
    fixed = RunFigures(
        run(2, parent=1, name="fix"),
        RunSummary(2, 20, 20, 0.0, 40 * GIB, 44 * GIB + 512 * MIB, None),
        None,
        series([1.5, 1.4, 1.6]),
    )

    table = figures_table([oom, fixed]).set_index("")

    assert list(table.columns) == ["run 1", "run 2 · fix", "run 2 vs run 1"]
    # The failed run needed at least what it held plus the request that failed: the saving is a floor.
    assert table.loc["Peak allocated"].tolist() == [
        "≥ 73.0 GiB needed (70.0 GiB held at the failure + the failed request)",
        "40.0 GiB",
        "−33.0 GiB or more",
    ]
    assert table.loc["Peak reserved"].tolist() == [
        "≥ 81.0 GiB needed (78.0 GiB held at the failure + the failed request)",
        "44.5 GiB",
        "−36.5 GiB or more",
    ]
    assert "Peak RSS" not in table.index  # no run has the reading: left out rather than all n/a
    assert table.loc["Failed request"].tolist() == ["3.0 GiB", "n/a", ""]
    assert table.loc["Median step time"].tolist() == ["1.100 s", "1.500 s", "+0.400 s"]
    assert table.loc["Status"].tolist() == ["oom", "completed", ""]
