"""What a run's status means to a reader: which runs are lost, and how each status is shown."""

from __future__ import annotations

from db.queries import RunRecord, is_lost

# The stored statuses plus "lost", which is read from a stale heartbeat rather than stored.
DISPLAY_STATUSES = ("running", "completed", "oom", "killed", "lost", "failed", "stopped")

# status: (emoji for table cells, st.badge colour, material icon, what it means)
_LOOK = {
    "running": ("🔵", "blue", ":material/sync:", "training now; the page refreshes itself"),
    "completed": ("🟢", "green", ":material/check_circle:", "reached train.max_steps"),
    "oom": ("🔴", "red", ":material/memory:", "ran out of memory; a post-mortem was saved"),
    "killed": ("🟣", "violet", ":material/dangerous:", "the trainer process was killed by a signal"),
    "lost": ("⚪", "gray", ":material/help:", "still marked running, but its process stopped reporting"),
    "failed": ("🟠", "orange", ":material/error:", "ended with an error other than out of memory"),
    "stopped": ("⚫", "gray", ":material/stop_circle:", "stopped on request (SIGTERM)"),
}


def display_status(run: RunRecord, now: float) -> str:
    return "lost" if is_lost(run, now) else run.status


def is_live(run: RunRecord, now: float) -> bool:
    """Running and still reporting: the only runs worth refreshing, or stopping."""
    return display_status(run, now) == "running"


def cell_label(status: str) -> str:
    return f"{_LOOK[status][0]} {status}"


def badge_color(status: str) -> str:
    return _LOOK[status][1]


def badge_icon(status: str) -> str:
    return _LOOK[status][2]


def meaning(status: str) -> str:
    return _LOOK[status][3]
