"""Pages of the labeling app, run by `st.navigation` from labeling_app/app.py."""
