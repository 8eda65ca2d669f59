"""`rlhf rloo`: REINFORCE Leave-One-Out on the suite's reward model (TRL's RLOOTrainer)."""
