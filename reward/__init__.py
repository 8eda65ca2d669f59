"""`rlhf reward` (a Bradley–Terry reward model with TRL's RewardTrainer; the loss in loss.py) and `rlhf score`."""
