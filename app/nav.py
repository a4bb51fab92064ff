"""The dashboard's pages in one place, so the menu and every link between pages agree."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PageSpec:
    path: str  # the page's script, relative to app/main.py (st.Page and st.page_link take it)
    title: str
    url_path: str
    icon: str


RUNS = PageSpec("screens/runs.py", "Runs", "runs", ":material/list:")
RUN = PageSpec("screens/run.py", "Run", "run", ":material/monitoring:")
LAUNCH = PageSpec("screens/launch.py", "Launch", "launch", ":material/rocket_launch:")
POSTMORTEMS = PageSpec("screens/postmortems.py", "Post-mortems", "postmortems", ":material/memory:")
COMPARE = PageSpec("screens/compare.py", "Compare", "compare", ":material/compare_arrows:")
DIAGNOSE = PageSpec("screens/diagnose.py", "Diagnose", "diagnose", ":material/troubleshoot:")
PLAN = PageSpec("screens/plan.py", "Plan", "plan", ":material/calculate:")
# In menu order; the first is the landing page.
PAGES = (RUNS, RUN, LAUNCH, POSTMORTEMS, COMPARE, DIAGNOSE, PLAN)
