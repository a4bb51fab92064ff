"""Where pages get their data: one engine per database URL, query results cached for a second.

Pages call these rather than db.queries directly, so that every read is cached with a TTL (without
one a result is cached forever, and a live run would freeze) and no page opens a connection. The
URL is an argument because Streamlit keys its caches by the arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st
from sqlalchemy import Engine, make_url

from db import default_db_url, open_engine, queries
from db.queries import (
    DeviceSeries,
    LayerRecord,
    PostmortemRecord,
    RunRecord,
    RunSummary,
    StepEvent,
    StepRecord,
    StepSeries,
)
from diagnosis.suggest import (
    Suggestion,
    cached_bytes,
    evidence_for_run,
    failed_request_text,
    shortfall_bytes,
    suggest,
)

# Under the live page's refresh period (app/screens/run.py), so each refresh reads fresh rows.
TTL_S = 1.0
# Buckets per chart: about one per two pixels of a wide chart; each bucket sends its min and max.
MAX_POINTS = 500


def db_url() -> str:
    return default_db_url()


def printable_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@st.cache_resource(show_spinner=False)
def engine(url: str) -> Engine:
    return open_engine(url)


def open_database() -> str:
    """The URL pages read, with its engine open; an unreadable database stops the page with the reason."""
    url = db_url()
    try:
        engine(url)
    except Exception as error:  # noqa: BLE001 - any failure to open is shown as a message, never a traceback
        st.error(
            f"Cannot open the oomlens database at `{printable_url(url)}`: {error}\n\n"
            "Set `OOMLENS_DB_URL` to a SQLAlchemy URL, or `OOMLENS_WORKSPACE` to a writable folder, and reload."
        )
        st.stop()
    return url


@st.cache_data(ttl=TTL_S, show_spinner=False)
def runs(url: str) -> list[RunRecord]:
    return queries.list_runs(engine(url))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def run(url: str, run_id: int) -> RunRecord | None:
    return queries.get_run(engine(url), run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def summaries(url: str) -> dict[int, RunSummary]:
    return queries.run_summaries(engine(url))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def summary(url: str, run_id: int) -> RunSummary | None:
    return queries.run_summaries(engine(url), [run_id]).get(run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def recent_steps(url: str, run_id: int, limit: int = 20) -> list[StepRecord]:
    return queries.recent_steps(engine(url), run_id, limit)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def step_series(url: str, run_id: int, columns: tuple[str, ...]) -> StepSeries:
    return queries.step_series(engine(url), run_id, columns, max_points=MAX_POINTS)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def step_events(url: str, run_id: int) -> list[StepEvent]:
    return queries.step_events(engine(url), run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def device_series(url: str, run_id: int, columns: tuple[str, ...]) -> DeviceSeries:
    return queries.device_series(engine(url), run_id, columns, max_points=MAX_POINTS)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def postmortem(url: str, run_id: int) -> PostmortemRecord | None:
    return queries.get_postmortem(engine(url), run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def top_layers(url: str, run_id: int, limit: int = 15) -> list[LayerRecord]:
    return queries.top_layers(engine(url), run_id, limit)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def oom_runs(url: str) -> list[RunRecord]:
    """Runs that ran out of memory, newest first."""
    return queries.list_runs(engine(url), status="oom")


@dataclass(frozen=True)
class Diagnosis:
    """A post-mortem read by diagnosis.suggest: ranked fixes and the two figures the page headlines."""

    fixes: list[Suggestion]
    cached_bytes: int | None
    shortfall_bytes: int | None
    # What the failed request was, with the arithmetic (diagnosis.failed_request); None when unnamed.
    request: str | None = None


@st.cache_data(ttl=TTL_S * 30, show_spinner=False)
def diagnosis(url: str, run_id: int) -> Diagnosis | None:
    """Worth caching longer than rows: a post-mortem never changes, and the estimator what-ifs take ~0.2 s."""
    run, postmortem = queries.get_run(engine(url), run_id), queries.get_postmortem(engine(url), run_id)
    if run is None or postmortem is None:
        return None
    evidence = evidence_for_run(dataclasses.asdict(postmortem), run.config, run.environment)
    return Diagnosis(
        suggest(evidence), cached_bytes(evidence), shortfall_bytes(evidence), failed_request_text(evidence)
    )


_CACHED: tuple[Callable, ...] = (
    runs,
    run,
    summaries,
    summary,
    recent_steps,
    step_series,
    step_events,
    device_series,
    postmortem,
    top_layers,
    oom_runs,
    diagnosis,
)


def forget() -> None:
    """Drop cached results after this process changed the database, so the next render shows it."""
    for function in _CACHED:
        function.clear()
