"""The Streamlit dashboard (issue #5)."""
