"""Llama-family model assembly and the shape presets."""
from .llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
