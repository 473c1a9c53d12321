"""badit_exp: multi-task and continual instruction-tuning of LLMs (BADIT and baselines)."""

__version__ = "0.1.0"
