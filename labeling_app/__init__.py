"""The Streamlit labeling app (not built yet: see the human-feedback issue)."""
