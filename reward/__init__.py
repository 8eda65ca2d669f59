"""Reward-model stage (not built yet: see the reward issue)."""
