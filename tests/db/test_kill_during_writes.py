"""A process killed while it writes (SIGKILL: the kernel's OOM killer, a scheduler) must leave the
database intact and every batch either wholly stored or absent, rollups included. Killed many times,
at random moments, by a real writer process doing what the sink does."""

import random
import signal
import subprocess
import sys
import time

from sqlalchemy import text

from db import open_engine
from db.writes import create_run
from tests.conftest import subprocess_env

BATCH = 37  # steps per transaction: not a divisor of the rollup width, so batches straddle buckets

WRITER = f"""
import sys, time
from collector.readings import HostReading, StepSample, TensorBreakdown
from db import open_engine
from db.writes import write_records
from sqlalchemy import text

engine = open_engine(sys.argv[1])
run_id = int(sys.argv[2])
with engine.connect() as conn:
    last = text("SELECT coalesce(max(step), 0) FROM step_samples WHERE run_id = :r")
    step = conn.execute(last, {{"r": run_id}}).scalar()
print("ready", flush=True)
while True:
    batch = []
    for _ in range({BATCH}):
        step += 1
        batch.append(StepSample(
            step=step, wall_time=time.time(), loss=1.0, tokens=8, seq_len=4, step_seconds=0.01, tokens_per_s=800.0,
            allocator=None,
            tensors=TensorBreakdown(parameter_bytes=step, trainable_parameter_bytes=1, gradient_bytes=1,
                                    optimizer_state_bytes=2, activation_bytes=step * 3),
            host=HostReading(taken_at=time.time(), rss_bytes=step, peak_rss_bytes=step, cpu_percent=None),
        ))
    write_records(engine, run_id, batch)
"""


def test_sigkill_mid_write_never_half_writes_a_batch(db_url):
    engine = open_engine(db_url)
    run_id = create_run(engine, {"model": {"name": "tiny-llama"}})
    rng = random.Random(7)
    kills = 0
    for _ in range(8):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, db_url, str(run_id)],
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        kills += writer.returncode == -signal.SIGKILL
        with open_engine(db_url).connect() as conn:
            assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
            steps = [row[0] for row in conn.execute(text("SELECT step FROM step_samples ORDER BY step"))]
            # Whole batches only, and no gap: a killed batch left nothing behind.
            assert len(steps) % BATCH == 0 and steps == list(range(1, len(steps) + 1))
            rolled = conn.execute(
                text(
                    "SELECT coalesce(sum(steps), 0), coalesce(max(max_activation_bytes), 0) "
                    "FROM step_rollups WHERE run_id = :r"
                ),
                {"r": run_id},
            ).one()
            assert tuple(rolled) == (len(steps), 3 * len(steps))
    assert kills == 8
    assert steps, "the writer never committed a batch: the kills came too early to test anything"
