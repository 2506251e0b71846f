"""Routing policies: which served model answers a request.

Explicit routing is the request's `model` field. A cascade is a virtual model: the small model answers first, and
when its answer's mean token log-probability falls below the threshold (the small model was unsure), the large
model answers again; the response says which one answered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InferRecipesError

DEFAULT_THRESHOLD = -1.0


@dataclass(frozen=True)
class Cascade:
    name: str
    small: str
    large: str
    threshold: float = DEFAULT_THRESHOLD  # mean log-probability per generated token

    @staticmethod
    def confidence(logprobs: list[float] | None) -> float:
        """What the threshold is compared with: the answer's mean token log-probability (-inf without tokens)."""
        return sum(logprobs) / len(logprobs) if logprobs else -math.inf

    def escalate(self, logprobs: list[float] | None) -> bool:
        """True when the small model's answer is not confident enough to keep (always, without tokens)."""
        return not logprobs or self.confidence(logprobs) < self.threshold

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


async def answer(cascade: Cascade, pool, req, metrics) -> dict:
    """The cascade's completion body: SMALL answers every choice; the choices it was unsure of are asked of
    LARGE again. Each choice says `answered_by`; `usage` counts the tokens of both models (per model under
    `usage.cascade`), since both were computed."""
    from .jobs import Job
    from .protocol import usage
    from .responses import completion_body

    chat = hasattr(req, "messages")
    small = await pool.acquire(cascade.small)
    try:
        job = await Job.create(small, req, metrics, force_logprobs=True)
        try:
            finals = await job.run_all()
        finally:
            job.close()
    finally:
        pool.release(small)
    answered = {i: cascade.small for i in finals}
    confidence = {i: _mean(out.logprobs) for i, out in finals.items()}
    unsure = [i for i, out in finals.items() if cascade.escalate(out.logprobs)]
    counts = {"small": usage(sum(len(p) for p in job.prompts), sum(len(o.token_ids) for o in finals.values())),
              "large": usage(0, 0)}
    if unsure:
        large = await pool.acquire(cascade.large)
        try:
            job_large = await Job.create(large, req, metrics)
            try:
                results = await job_large.run_all(only=unsure)
            finally:
                job_large.close()
        finally:
            pool.release(large)
        for i, out in results.items():
            finals[i], answered[i] = out, cascade.large
        counts["large"] = usage(sum(len(job_large.prompts[p]) for p in {i // job_large.n for i in unsure}),
                                sum(len(out.token_ids) for out in results.values()))
    client_logprobs = req.logprobs if chat else req.logprobs is not None
    if not client_logprobs:  # asked for by the cascade, not the client
        for out in finals.values():
            out.logprobs = out.top_logprobs = None
    body = completion_body(job, chat, finals, cascade.name, answered)
    body["usage"] = {**usage(counts["small"]["prompt_tokens"] + counts["large"]["prompt_tokens"],
                             counts["small"]["completion_tokens"] + counts["large"]["completion_tokens"]),
                     "cascade": counts}
    body["cascade"] = {"small": cascade.small, "large": cascade.large, "threshold": cascade.threshold,
                       "small_mean_logprob": confidence}
    return body


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None
