"""`infer-recipes bench serve`: a load generator against a running OpenAI-compatible server.

Requests arrive as a Poisson process at `request_rate` per second (or all at once with `inf`), at most
`max_concurrency` in flight, each streamed so that time to first token and the gaps between tokens are seen as
the client sees them. Output length is fixed (end-of-sequence ignored) so runs are comparable.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..errors import InferRecipesError
from ..stats import summary

DEFAULT_SQUAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad" / "dev-v2.0.part-a.json"


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def squad_prompts(path: Path, count: int, seed: int) -> list[str]:
    if not path.is_file():
        raise InferRecipesError(f"{path} is absent: use --dataset random, or point --dataset-path at a SQuAD file")
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    contexts = [(p["context"], q["question"]) for a in data for p in a["paragraphs"] for q in p["qas"]]
    rng = random.Random(seed)
    picks = rng.sample(contexts, min(count, len(contexts)))
    while len(picks) < count:
        picks.append(rng.choice(contexts))
    return [f"{c}\n\nQuestion: {q}\nAnswer:" for c, q in picks]


def random_prompts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ("time person year way day thing man world life hand part child eye woman place work week case point "
             "government company number group problem fact").split()
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(count)]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, output_len: int,
               headers: dict) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                result.error = f"HTTP {r.status_code}: {text[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", "error in stream")
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                if event.get("choices") and event["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run(url: str, model: str, prompts: list[str], output_len: int, request_rate: float,
              max_concurrency: int, api_key: str | None = None, slo: dict | None = None, seed: int = 0,
              progress: bool = True) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency)
    rng = random.Random(seed)
    done = 0

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        try:
            (await client.get(f"{url}/health")).raise_for_status()
        except httpx.HTTPError as e:
            raise InferRecipesError(f"no server at {url} ({e}): start one with `infer-recipes serve`") from None

        async def limited(prompt: str) -> RequestResult:
            nonlocal done
            async with limit:
                r = await _one(client, url, model, prompt, output_len, headers)
            done += 1
            if progress:
                print(f"\r{done}/{len(prompts)} requests", end="", flush=True, file=sys.stderr)
            return r

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if progress:
        print(file=sys.stderr)
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    report = {
        "url": url, "model": model, "num_prompts": len(prompts), "request_rate": request_rate,
        "max_concurrency": max_concurrency, "output_len": output_len,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "requests_per_s": len(ok) / duration,
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / duration,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "ttft_s": summary([r.ttft for r in ok]), "tpot_s": summary([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": summary([x for r in ok for x in r.itl]), "e2e_s": summary([r.e2e for r in ok]),
    }
    if slo:
        good = [r for r in ok if r.ttft <= slo.get("ttft", float("inf"))
                and (r.tpot or 0.0) <= slo.get("tpot", float("inf"))]
        report["slo"] = slo
        report["goodput_requests_per_s"] = len(good) / duration
        report["slo_attained"] = len(good) / len(results) if results else 0.0
    return report


def parse_slo(text: str | None) -> dict | None:
    """`ttft=0.5,tpot=0.05` (seconds)."""
    if not text:
        return None
    slo = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in ("ttft", "tpot", "e2e"):
            raise InferRecipesError(f"--slo {text!r}: expected ttft=SECONDS,tpot=SECONDS")
        try:
            slo[key.strip()] = float(value)
        except ValueError:
            raise InferRecipesError(f"--slo {text!r}: {value!r} is not a number of seconds") from None
    return slo


def format_report(r: dict) -> str:
    def ms(d, k):
        return "n/a" if d[k] is None else f"{d[k] * 1000:.1f}"

    lines = [f"model {r['model']} at {r['url']}: {r['num_prompts']} requests, rate {r['request_rate']}/s, "
             f"concurrency {r['max_concurrency']}, {r['output_len']} output tokens each",
             f"completed {r['completed']}, failed {r['failed']} in {r['duration_s']:.2f} s",
             f"requests/s {r['requests_per_s']:.2f}   output tokens/s {r['output_tokens_per_s']:.1f}",
             "| metric (ms) | mean | median | p99 |", "| --- | ---: | ---: | ---: |"]
    for key, label in (("ttft_s", "time to first token"), ("tpot_s", "time per output token"),
                       ("itl_s", "inter-token latency"), ("e2e_s", "end-to-end latency")):
        lines.append(f"| {label} | {ms(r[key], 'mean')} | {ms(r[key], 'median')} | {ms(r[key], 'p99')} |")
    if "goodput_requests_per_s" in r:
        lines.append(f"goodput {r['goodput_requests_per_s']:.2f} requests/s ({r['slo_attained']:.0%} within "
                     f"{r['slo']})")
    for e in r["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)

