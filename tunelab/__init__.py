"""tunelab: fine-tune large language models on a laptop CPU, one GPU or many."""

__version__ = "0.1.0"
