"""View models: what a page shows, computed from records without Streamlit, so it can be tested plainly."""
