"""llmopt: quantize, shard, serve and benchmark Hugging Face causal LMs near the hardware's limit."""

__version__ = "0.1.0"
