"""`rlhf grpo`: Group Relative Policy Optimization on the suite's reward model (TRL's GRPOTrainer)."""
