"""Ranked fixes drawn one way on every page: rank, category, saving, confidence, verdict, the change, why.

A reader who has seen the Post-mortems page should read the Diagnose page's fixes without
relearning: same order of facts, same verdict badges (app.views.postmortem words them).
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from app.views import postmortem as view
from diagnosis.suggest import Suggestion

VERDICT_LOOK = {
    "cannot help": ("red", ":material/block:"),
    "fits alone": ("green", ":material/check_circle:"),
    "helps, not enough alone": ("orange", ":material/trending_down:"),
    "helps": ("blue", ":material/trending_down:"),
}


def card(rank: int, fix: Suggestion) -> None:
    """One fix in a bordered box; the caller may add a button inside the same `with` block after it."""
    verdict = view.verdict(fix)
    color, icon = VERDICT_LOOK[verdict]
    title, badge = st.columns([4, 1])
    title.markdown(
        f"**{rank}. {view.category_label(fix.category)}** · {view.saves_text(fix)} · confidence {fix.confidence}"
    )
    with badge:
        st.badge(verdict, color=color, icon=icon)
    st.code(fix.change, language=None)
    st.markdown(fix.why)


def cards(fixes: Sequence[Suggestion]) -> None:
    for rank, fix in enumerate(fixes, start=1):
        with st.container(border=True):
            card(rank, fix)
