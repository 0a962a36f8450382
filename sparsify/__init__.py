"""sparsify: compress Hugging Face transformer checkpoints into ones the ecosystem loads as-is."""

__version__ = "0.1.0"
