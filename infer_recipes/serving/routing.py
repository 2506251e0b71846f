"""Routing policies: which served model answers a request.

Explicit routing is the request's `model` field. A cascade is a virtual model: the small model answers first, and
when its answer's mean token log-probability falls below the threshold (the small model was unsure), the large
model answers again; the response says which one answered.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InferRecipesError

DEFAULT_THRESHOLD = -1.0


@dataclass(frozen=True)
class Cascade:
    name: str
    small: str
    large: str
    threshold: float = DEFAULT_THRESHOLD  # mean log-probability per generated token

    def escalate(self, logprobs: list[float] | None) -> bool:
        """True when the small model's answer is not confident enough to keep."""
        if not logprobs:
            return True
        return sum(logprobs) / len(logprobs) < self.threshold

    @staticmethod
    def parse(arg: str, models: list[str]) -> "Cascade":
        """`NAME=SMALL,LARGE[,THRESHOLD]`."""
        name, sep, rest = arg.partition("=")
        parts = rest.split(",")
        if not sep or not name or len(parts) not in (2, 3):
            raise InferRecipesError(f"--cascade {arg!r}: expected NAME=SMALL,LARGE[,THRESHOLD], e.g. "
                                    f"auto=small,large,-1.0")
        for part in parts[:2]:
            if part not in models:
                raise InferRecipesError(f"--cascade {arg!r}: {part!r} is not a served model ({', '.join(models)})")
        if name in models:
            raise InferRecipesError(f"--cascade {arg!r}: {name!r} is already a model's name")
        try:
            threshold = float(parts[2]) if len(parts) == 3 else DEFAULT_THRESHOLD
        except ValueError:
            raise InferRecipesError(f"--cascade {arg!r}: the threshold {parts[2]!r} is not a number") from None
        return Cascade(name, parts[0], parts[1], threshold)
