"""Weight quantization: each format a drop-in replacement for nn.Linear, registered in `api.SCHEMES`."""
from .api import SCHEMES, quantize

__all__ = ["SCHEMES", "quantize"]
