"""rlzoo: a benchmarking suite for credit assignment in RL fine-tuning of LLMs."""

__version__ = "0.1.0"
