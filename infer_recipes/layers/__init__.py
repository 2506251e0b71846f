"""The math of a Llama-family block: norms, rotary embeddings, activations, attention."""
