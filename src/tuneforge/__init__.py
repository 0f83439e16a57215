"""tuneforge: fine-tune open chat LLMs and chat with the result."""

__version__ = "0.1.0"
