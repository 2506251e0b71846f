"""Requests, the generation loop and the offline `LLM` API."""
