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
        before = await _connect(client, url, headers)

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
        after = await _server_state(client, url, headers)
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
        "prefix_cache_hit_rate": _hit_rate(before, after, model),
    }
    if slo:
        good = [r for r in ok if r.ttft <= slo.get("ttft", float("inf"))
                and (r.tpot or 0.0) <= slo.get("tpot", float("inf"))]
        report["slo"] = slo
        report["goodput_requests_per_s"] = len(good) / duration
        report["slo_attained"] = len(good) / len(results) if results else 0.0
    return report


def _hit_rate(before: dict, after: dict, model: str) -> float | None:
    """Prompt tokens found in the model's prefix cache over those looked up, between two /metrics reads."""
    b, a = before["prefix"].get(model, {}), after["prefix"].get(model, {})
    queries = a.get("queries", 0.0) - b.get("queries", 0.0)
    return (a.get("hits", 0.0) - b.get("hits", 0.0)) / queries if queries else None


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
    if r.get("prefix_cache_hit_rate") is not None:
        lines.append(f"prefix cache hit rate {r['prefix_cache_hit_rate']:.1%} of prompt tokens")
    if "goodput_requests_per_s" in r:
        lines.append(f"goodput {r['goodput_requests_per_s']:.2f} requests/s ({r['slo_attained']:.0%} within "
                     f"{r['slo']})")
    for e in r["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)



# ---- soak: a long mixed load (good, bad and abandoned requests) against one or more models ---------------------
BAD_BODIES = [  # each must be refused with a 4xx and OpenAI's error object, and harm nobody else
    {"prompt": "hi", "max_tokens": "10"}, {"prompt": [True, False]}, {"prompt": "x\ud800y"},
    {"prompt": "hi", "seed": 2**64}, {"prompt": "hi", "temperature": -1}, {"prompt": "hi", "tools": []},
    {"prompt": "word " * 40_000}, {"prompt": "hi", "n": 10_000}, {"prompt": "hi", "frobnicate": True},
]


async def _bad(client: httpx.AsyncClient, url: str, model: str, body: dict, headers: dict) -> str | None:
    """Sends one bad request; None when it was refused as it should be (4xx with the error object)."""
    raw = json.dumps({"model": model, **body}).encode("utf-8", "surrogatepass")
    try:
        r = await client.post(f"{url}/v1/completions", content=raw, headers={**headers,
                                                                            "Content-Type": "application/json"})
    except httpx.HTTPError as e:
        return f"bad request: {type(e).__name__}: {e}"
    if not 400 <= r.status_code < 500:
        return f"bad request answered {r.status_code}: {r.text[:120]}"
    try:
        err = r.json()["error"]
        assert {"message", "type", "param", "code"} <= set(err)
    except Exception:
        return f"bad request answered {r.status_code} without the error object: {r.text[:120]}"
    return None


async def _abandon(client: httpx.AsyncClient, url: str, model: str, prompt: str, output_len: int, headers: dict,
                   after: float, stream: bool) -> None:
    """A client that sends a long request and goes away after `after` seconds."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len * 4, "temperature": 0.0, "stream": stream,
            "ignore_eos": True}
    try:
        await asyncio.wait_for(client.post(f"{url}/v1/completions", json=body, headers=headers), after)
    except (asyncio.TimeoutError, httpx.HTTPError):
        pass


async def _connect(client: httpx.AsyncClient, url: str, headers: dict) -> dict:
    """The server's state (see `_server_state`) once it answers /health; a one-line error when nothing does."""
    try:
        (await client.get(f"{url}/health")).raise_for_status()
        return await _server_state(client, url, headers)
    except httpx.HTTPError as e:
        raise InferRecipesError(f"no server at {url} ({e}): start one with `infer-recipes serve`") from None


async def _server_state(client: httpx.AsyncClient, url: str, headers: dict) -> dict:
    """The server's resident memory and each model's free / total KV blocks, from /metrics."""
    text = (await client.get(f"{url}/metrics", headers=headers)).text
    state: dict = {"rss_bytes": None, "kv": {}, "prefix": {}}
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            state["rss_bytes"] = float(line.split()[1])
        for key in ("queries", "hits"):
            prefix = f"infer_recipes_prefix_cache_{key}_total{{model=\""
            if line.startswith(prefix):
                model = line[len(prefix):].split('"')[0]
                state["prefix"].setdefault(model, {})[key] = float(line.split()[-1])
        for key in ("free", "total"):
            prefix = f"infer_recipes_kv_cache_{key}_blocks{{model=\""
            if line.startswith(prefix):
                model = line[len(prefix):].split('"')[0]
                state["kv"].setdefault(model, {})[key] = float(line.split()[-1])
    return state


async def soak(url: str, models: list[str], prompts: list[str], output_len: int, duration: float,
               max_concurrency: int, bad_fraction: float, abandon_fraction: float, window: float = 30.0,
               api_key: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Keeps `max_concurrency` clients busy for `duration` seconds, each request going to the next model in
    turn: a `bad_fraction` of them malformed, an `abandon_fraction` dropped by their client mid-way, the rest
    good (streamed, exactly `output_len` tokens). Reports per window of `window` seconds the good requests
    completed, unexpected outcomes (a good request failing, a bad one not refused cleanly) and the p99
    end-to-end latency, and the server's resident memory; at the end, whether every KV pool is full again."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    events: list[tuple[float, str, float | None, str]] = []  # (time, kind, e2e, error)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        start_state = await _connect(client, url, headers)
        start = time.perf_counter()
        rss: list[tuple[float, float | None]] = [(0.0, start_state["rss_bytes"])]
        counter = 0

        async def client_loop(worker: int) -> None:
            nonlocal counter
            local = random.Random(seed * 1000 + worker)
            while time.perf_counter() - start < duration:
                counter += 1
                model, roll = models[counter % len(models)], local.random()
                t0 = time.perf_counter()
                if roll < bad_fraction:
                    error = await _bad(client, url, model, local.choice(BAD_BODIES), headers)
                    events.append((t0 - start, "bad", None, error or ""))
                elif roll < bad_fraction + abandon_fraction:
                    await _abandon(client, url, model, local.choice(prompts), output_len, headers,
                                   local.uniform(0.05, 1.0), local.random() < 0.5)
                    events.append((t0 - start, "abandoned", None, ""))
                else:
                    r = await _one(client, url, model, local.choice(prompts), output_len, headers)
                    error = r.error if not r.ok else ("" if r.output_tokens == output_len else
                                                      f"{r.output_tokens} tokens, not {output_len}")
                    events.append((t0 - start, "good", r.e2e if r.ok else None, error))

        async def watch() -> None:
            while time.perf_counter() - start < duration:
                await asyncio.sleep(min(window, max(0.1, duration - (time.perf_counter() - start))))
                state = await _server_state(client, url, headers)
                rss.append((time.perf_counter() - start, state["rss_bytes"]))
                if progress:
                    print(f"\r{time.perf_counter() - start:.0f}/{duration:.0f} s, {len(events)} requests",
                          end="", flush=True, file=sys.stderr)

        await asyncio.gather(watch(), *(client_loop(w) for w in range(max_concurrency)))
        elapsed = time.perf_counter() - start
        await asyncio.sleep(2.0)  # aborts of the last abandoned requests land at the next step
        end_state = await _server_state(client, url, headers)
        (await client.get(f"{url}/health")).raise_for_status()
    if progress:
        print(file=sys.stderr)
    windows = []
    for w in range(int(-(-duration // window))):  # requests are counted in the window they started in
        inside = [e for e in events if w * window <= e[0] < (w + 1) * window]
        good = sorted(e[2] for e in inside if e[1] == "good" and e[2] is not None)
        memory = [m for t, m in rss if t <= (w + 1) * window and m is not None]
        windows.append({"start_s": w * window, "good_completed": len(good),
                        "bad": sum(e[1] == "bad" for e in inside), "abandoned": sum(e[1] == "abandoned" for e in inside),
                        "unexpected": sum(bool(e[3]) for e in inside),
                        "e2e_p99_s": summary(good)["p99"] if good else None,
                        "rss_mb": memory[-1] / 2**20 if memory else None})
    unexpected = [e[3] for e in events if e[3]]
    kinds = {k: sum(e[1] == k for e in events) for k in ("good", "bad", "abandoned")}
    return {"url": url, "models": models, "duration_s": elapsed, "max_concurrency": max_concurrency,
            "output_len": output_len, "bad_fraction": bad_fraction, "abandon_fraction": abandon_fraction,
            "requests": kinds, "unexpected": len(unexpected), "unexpected_errors": sorted(set(unexpected))[:10],
            "error_rate": len(unexpected) / max(1, len(events)),
            "good_e2e_s": summary([e[2] for e in events if e[1] == "good" and e[2] is not None]),
            "windows": windows,
            "rss_start_mb": (start_state["rss_bytes"] or 0) / 2**20, "rss_end_mb": (end_state["rss_bytes"] or 0) / 2**20,
            "kv_pools_full_at_end": {m: v.get("free") == v.get("total") for m, v in end_state["kv"].items()}}


def format_soak(r: dict) -> str:
    lines = [f"soak of {', '.join(r['models'])} at {r['url']}: {r['duration_s']:.0f} s, concurrency "
             f"{r['max_concurrency']}, {r['output_len']} tokens per good request",
             f"requests: {r['requests']['good']} good, {r['requests']['bad']} bad, {r['requests']['abandoned']} "
             f"abandoned; unexpected outcomes {r['unexpected']} (error rate {r['error_rate']:.2%})",
             f"resident memory {r['rss_start_mb']:.0f} MB at the start, {r['rss_end_mb']:.0f} MB at the end; KV pools "
             f"full at the end: {r['kv_pools_full_at_end']}",
             "| window from s | good completed | bad | abandoned | unexpected | p99 e2e s | RSS MB |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for w in r["windows"]:
        p99 = "n/a" if w["e2e_p99_s"] is None else f"{w['e2e_p99_s']:.2f}"
        rss = "n/a" if w["rss_mb"] is None else f"{w['rss_mb']:.0f}"
        lines.append(f"| {w['start_s']:.0f} | {w['good_completed']} | {w['bad']} | {w['abandoned']} | "
                     f"{w['unexpected']} | {p99} | {rss} |")
    lines += [f"unexpected: {e}" for e in r["unexpected_errors"]]
    return "\n".join(lines)
