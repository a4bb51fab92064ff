"""The dashboard's entry point (`streamlit run app/main.py`): it routes to pages and does nothing else."""

import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path, not the repository that holds db/ and diagnosis/.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import streamlit as st  # noqa: E402

from app import nav  # noqa: E402

st.set_page_config(page_title="oomlens", page_icon=":material/memory:", layout="wide")
pages = [
    st.Page(page.path, title=page.title, url_path=page.url_path, icon=page.icon, default=index == 0)
    for index, page in enumerate(nav.PAGES)
]
st.navigation(pages).run()
