"""ckptkit: convert and reshard LLM checkpoints between Megatron-LM and Hugging Face."""
__version__ = "0.1.0"
