"""Measurement through the public API: load generation against the server."""
