"""PPO and DPO stages (not built yet: see the policy issue)."""
