"""`rlhf ppo` (the suite's own PPO: pure math in core.py, rollouts in rollout.py, the loop in ppo.py) and `rlhf dpo` (dpo.py, TRL's DPOTrainer)."""
