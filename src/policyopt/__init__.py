"""policyopt: post-train language models with SFT, Bradley–Terry reward models, PPO and GRPO."""

__version__ = "0.1.0"
