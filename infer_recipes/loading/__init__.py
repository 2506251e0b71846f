"""Finding and reading a model: a Hugging Face directory, a GGUF file, an alias, or `synthetic:<preset>`."""
from .source import ModelSource, resolve_model_source
from .weights import load_model

__all__ = ["ModelSource", "resolve_model_source", "load_model"]
