"""tokenrelay: stream an LLM's answer from a model API to the people and programs waiting for it."""

__version__ = "0.1.0"

__all__ = ["__version__"]
