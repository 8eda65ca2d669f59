"""The Streamlit labeling app (`rlhf label`): annotators rank responses and vote A/B; admins load task sets and export."""
