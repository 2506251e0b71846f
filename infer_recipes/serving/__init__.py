"""The OpenAI-compatible server: protocol, model pool, routing policies, metrics."""
