"""`rlhf dpo`: direct preference optimisation with TRL's DPOTrainer (train.py)."""
