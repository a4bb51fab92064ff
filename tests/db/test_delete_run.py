from __future__ import annotations

from sqlalchemy import func, select

from collector.readings import DeviceReading, LayerReading
from db.queries import get_postmortem, get_run, layer_profile, run_summaries, step_samples
from db.schema import DeviceSampleRow, device_rollups, step_rollups
from db.writes import create_run, delete_run, record_postmortem, write_records
from tests.db.test_series import sample
from tests.db.test_writes import MINIMAL_POSTMORTEM


def _rows(engine, table, run_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(table.c.run_id == run_id)).scalar_one()


def _recorded_run(engine, parent: int | None = None) -> int:
    run_id = create_run(engine, {"model": {"name": "tiny-llama"}}, parent_run_id=parent)
    device = DeviceReading(
        taken_at=1_700_000_000.0,
        gpu_index=0,
        memory_used_bytes=1,
        memory_total_bytes=2,
        gpu_util_percent=None,
        memory_util_percent=None,
        temperature_c=None,
        power_w=None,
        process_used_bytes=None,
    )
    write_records(engine, run_id, [sample(s, 2**30) for s in range(1, 70)] + [device, LayerReading(1, "model", 5)])
    record_postmortem(engine, run_id, MINIMAL_POSTMORTEM)
    return run_id


def test_delete_run_removes_the_run_and_everything_recorded_for_it(engine):
    doomed = _recorded_run(engine)
    kept = _recorded_run(engine)
    child = create_run(engine, {}, parent_run_id=doomed)

    assert delete_run(engine, doomed) is True

    assert get_run(engine, doomed) is None and get_postmortem(engine, doomed) is None
    assert step_samples(engine, doomed) == [] and layer_profile(engine, doomed) == []
    for table in (DeviceSampleRow.__table__, step_rollups, device_rollups):
        assert _rows(engine, table, doomed) == 0
    assert doomed not in run_summaries(engine)
    # Another run keeps all of its rows; a re-run of the deleted one loses only the link.
    assert len(step_samples(engine, kept)) == 69 and get_postmortem(engine, kept) is not None
    assert _rows(engine, step_rollups, kept) == 2 and _rows(engine, device_rollups, kept) == 1
    assert get_run(engine, child).parent_run_id is None


def test_deleting_a_missing_run_changes_nothing(engine):
    kept = _recorded_run(engine)
    assert delete_run(engine, kept + 1) is False
    assert len(step_samples(engine, kept)) == 69
