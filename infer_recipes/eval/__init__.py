"""Accuracy measurement through the public API: perplexity and agreement with the unoptimized model."""
