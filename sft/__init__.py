"""Supervised fine-tuning stage: `rlhf sft`."""
