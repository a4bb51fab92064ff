"""A run's headline numbers (progress, speed, time left), from its row and its latest steps."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from app.views.status import display_status
from db.queries import RunRecord, RunSummary, StepRecord


@dataclass(frozen=True)
class RunFacts:
    status: str
    model: str
    device: str
    steps_done: int  # the last recorded step (steps count from 1)
    max_steps: int | None
    tokens_per_s: float | None  # median of the latest steps: one slow step does not swing it
    step_seconds: float | None
    eta_s: float | None  # running runs only
    duration_s: float | None  # from start to end, or to now / the last heartbeat


def model_name(run: RunRecord) -> str:
    return str((run.config.get("model") or {}).get("name", "?"))


def device_label(run: RunRecord) -> str:
    if run.device_name:
        return f"{run.device_name} ({run.device})" if run.device and run.device.startswith("cuda") else run.device_name
    return run.device or "not started yet"


def max_steps(run: RunRecord) -> int | None:
    value = (run.config.get("train") or {}).get("max_steps")
    return value if isinstance(value, int) else None


def duration_s(run: RunRecord, now: float) -> float | None:
    start = run.started_at or run.created_at
    if run.ended_at is not None:
        end = run.ended_at
    elif display_status(run, now) == "lost":
        end = run.heartbeat_at or start  # it stopped reporting then, not now
    else:
        end = now
    return max(0.0, end - start)


def run_facts(run: RunRecord, summary: RunSummary | None, recent: list[StepRecord], now: float) -> RunFacts:
    status = display_status(run, now)
    speeds = [s.tokens_per_s for s in recent if s.tokens_per_s is not None]
    step_s = statistics.median(s.step_seconds for s in recent) if recent else None
    done = summary.last_step if summary else 0
    total = max_steps(run)
    eta = None
    if status == "running" and total is not None and step_s is not None:
        eta = max(0, total - done) * step_s
    return RunFacts(
        status=status,
        model=model_name(run),
        device=device_label(run),
        steps_done=done,
        max_steps=total,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        step_seconds=step_s,
        eta_s=eta,
        duration_s=duration_s(run, now),
    )


def human_duration(seconds: float | None) -> str:
    """'45 s', '12 min 05 s', '3 h 02 min', '2 d 4 h': two units are enough to read a duration."""
    if seconds is None:
        return "n/a"
    total = int(round(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def steps_label(done: int, total: int | None) -> str:
    return f"{done:,} / {total:,}" if total is not None else f"{done:,}"
