"""`rlhf ppo`, the suite's own PPO: the pure math in core.py, the sampler's state in rollout.py, the loop in train.py."""
