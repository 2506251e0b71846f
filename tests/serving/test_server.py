"""A real server on loopback, driven with the official `openai` SDK (and raw HTTP where the SDK validates first)."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import pytest
from server_utils import free_port, start, stop

openai = pytest.importorskip("openai")

KEY = "test-key"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm):  # smollm: skips when the model package is absent
    proc, url = start(["-m", "smollm2=smollm2-135m-instruct",
                        "-m", "int8=smollm2-135m-instruct,quantization=int8,kv_cache_dtype=int8",
                        "-m", "tiny=synthetic:tiny-llama3,max_batch_size=1,max_waiting=1",
                        "-m", "spec=smollm2-135m-instruct,speculative_model=ngram",
                        "--max-model-len", "512", "--api-key", KEY, "--cascade", "auto=int8,smollm2,-0.5"])
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def _metric(url: str, name: str, model: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    m = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} not in /metrics"
    return float(m.group(1))


def test_every_model_and_the_cascade_are_listed(client):
    assert [m.id for m in client.models.list().data] == ["smollm2", "int8", "tiny", "spec", "auto"]
    assert client.models.retrieve("spec").id == "spec" and client.models.retrieve("auto").id == "auto"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-17")
    assert e.value.body["code"] == "model_not_found" and "smollm2" in e.value.body["message"]


def test_tokenize_and_detokenize_as_vllm_shapes_them(server, smollm):
    def post(path, body):
        return httpx.post(f"{server}/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    text = "Héllo, world! 1234"
    r = post("tokenize", {"model": "smollm2", "prompt": text, "return_token_strs": True}).json()
    ids = smollm.tokenizer.encode(text)
    assert r == {"count": len(ids), "max_model_len": 512, "tokens": ids,
                 "token_strs": [smollm.tokenizer.tokenizer.id_to_token(i) for i in ids]}
    assert post("detokenize", {"model": "smollm2", "tokens": ids}).json() == {"prompt": text}
    # a conversation: exactly the prompt a chat completion is given
    r = post("tokenize", {"model": "smollm2", "messages": CHAT}).json()
    assert r["tokens"] == smollm.tokenizer.encode_chat(CHAT) and r["token_strs"] is None
    usage = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="smollm2", messages=CHAT, max_tokens=1).usage
    assert r["count"] == usage.prompt_tokens
    for path, body, param in [("detokenize", {"model": "smollm2", "tokens": [49152]}, "tokens"),
                              ("tokenize", {"model": "smollm2"}, None),
                              ("tokenize", {"model": "smollm2", "prompt": "a", "messages": CHAT}, None),
                              ("tokenize", {"model": "auto", "prompt": "a"}, "model")]:
        r = post(path, body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (body, r.text)


def test_speculative_model_answers_as_the_model_and_reports_its_guesses(client, server):
    prompt = ("Copy the list exactly.\nList: apples, pears, plums, cherries, grapes, lemons, limes, figs.\n"
              "Copy: apples, pears,")
    kw = dict(prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(model="smollm2", **kw)
    spec = client.completions.create(model="spec", **kw)
    assert spec.choices[0].text == plain.choices[0].text
    guesses = spec.usage.model_extra["speculative"]
    assert 0 < guesses["accepted_tokens"] <= guesses["draft_tokens"]
    assert guesses["acceptance_rate"] == round(guesses["accepted_tokens"] / guesses["draft_tokens"], 4)
    assert "speculative" not in (plain.usage.model_extra or {})
    chunks = list(client.completions.create(model="spec", **kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.model_extra["speculative"] == guesses
    assert _metric(server, "infer_recipes_spec_decode_accepted_tokens_total", "spec") >= 2 * guesses["accepted_tokens"]


@pytest.mark.parametrize("model", ["smollm2", "int8"])
def test_chat_streaming_text_equals_non_streaming_and_usage_is_exact(client, model, smollm):
    kw = dict(model=model, messages=CHAT, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.model == model and full.id
    assert full.choices[0].finish_reason in ("stop", "length")
    assert "Paris" in full.choices[0].message.content
    assert full.usage.prompt_tokens == len(smollm.tokenizer.encode_chat(CHAT))
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]  # set once, in the last choice chunk
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content


def test_completions_stream_equals_non_stream_with_exact_token_counts(client, smollm):
    prompt = "The capital of France is"
    kw = dict(model="smollm2", prompt=prompt, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(smollm.tokenizer.encode(prompt)), 7)
    assert full.usage.total_tokens == full.usage.prompt_tokens + 7
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    # the same answer as the offline API
    from infer_recipes import SamplingParams

    assert full.choices[0].text == smollm.generate(prompt, SamplingParams(max_tokens=7, temperature=0,
                                                                          ignore_eos=True))[0].text


def test_n_stop_seed_and_logprobs(client):
    r = client.completions.create(model="smollm2", prompt="Count: one, two, three,", max_tokens=12, temperature=0,
                                  stop=[","], logprobs=3, n=2)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == r.choices[1].text
    assert "," not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    a = client.completions.create(model="smollm2", prompt="Once", max_tokens=10, temperature=1.0, seed=7)
    b = client.completions.create(model="smollm2", prompt="Once", max_tokens=10, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text
    chat = client.chat.completions.create(model="int8", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=2)
    first = chat.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 2 and first.top_logprobs[0].logprob >= first.top_logprobs[1].logprob


def test_cascade_says_which_model_answered(client):
    r = client.completions.create(model="auto", prompt="The capital of France is", max_tokens=8, temperature=0)
    extra = r.model_extra
    assert r.model == "auto" and extra["cascade"]["small"] == "int8"
    mean = extra["cascade"]["small_mean_logprob"]["0"]
    expected = "smollm2" if mean < -0.5 else "int8"
    assert r.choices[0].model_extra["answered_by"] == expected


def test_sixteen_concurrent_requests_all_succeed(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
        jobs = [c.chat.completions.create(model="smollm2" if i % 2 else "int8",
                                          messages=[{"role": "user", "content": f"Say the number {i}."}],
                                          max_tokens=16, temperature=0) for i in range(16)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert len(results) == 16 and all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    assert all(r.usage.completion_tokens >= 1 for r in results)


def test_an_aborted_stream_returns_the_kv_pool_to_full(server, client):
    total = _metric(server, "infer_recipes_kv_cache_total_blocks", "smollm2")
    stream = client.completions.create(model="smollm2", prompt="Tell me a long story.", max_tokens=400,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert _metric(server, "infer_recipes_kv_cache_free_blocks", "smollm2") < total  # the request holds blocks
    stream.close()
    deadline = time.monotonic() + 20
    while _metric(server, "infer_recipes_kv_cache_free_blocks", "smollm2") < total:
        assert time.monotonic() < deadline, "the aborted request's blocks were not freed"
        time.sleep(0.1)
    assert _metric(server, "infer_recipes_num_requests_running", "smollm2") == 0


def test_metrics_are_labelled_by_model_in_seconds(server, client):
    client.completions.create(model="int8", prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("infer_recipes_time_to_first_token_seconds_bucket", "infer_recipes_time_per_output_token_seconds_count",
                 "infer_recipes_e2e_request_latency_seconds_sum", "infer_recipes_prompt_tokens_total",
                 "infer_recipes_generation_tokens_total", "infer_recipes_num_requests_waiting",
                 "infer_recipes_kv_cache_usage_ratio", "infer_recipes_num_preemptions_total"):
        assert re.search(rf'^{name}\{{[^}}]*model="int8"', text, re.M), name
    # the int8 pool's real bytes: one per element and a float32 scale per token and head (SmolLM2: D = 64), against
    # the float32 pool's four
    per_token = {m: _metric(server, "infer_recipes_kv_cache_bytes_per_token", m) for m in ("smollm2", "int8")}
    assert per_token["int8"] == per_token["smollm2"] / 4 * (64 + 4) / 64 == 30 * 2 * 3 * (64 + 4)
    assert _metric(server, "infer_recipes_kv_cache_bytes", "int8") > 0


# ---- bad input: every case gets its status and OpenAI's error object ----------------------------------------------
def _post(url: str, path: str, body, key: str | None = KEY, raw: bool = False) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if raw else json.dumps(body)
    return httpx.post(f"{url}/v1/{path}", content=content, headers=headers, timeout=60)


BAD_CHAT = {
    "malformed JSON": ('{"model": "smollm2", "messages": [', True),
    "a non-object body": ('[1, 2, 3]', True),
    "NaN temperature": ('{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                        True),
    "empty messages": ({"model": "smollm2", "messages": []}, False),
    "a message without a role": ({"model": "smollm2", "messages": [{"content": "hi"}]}, False),
    "an unknown role": ({"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}, False),
    "content of the wrong type": ({"model": "smollm2", "messages": [{"role": "user", "content": 5}]}, False),
    "max_tokens 0": ({"model": "smollm2", "messages": CHAT, "max_tokens": 0}, False),
    "temperature < 0": ({"model": "smollm2", "messages": CHAT, "temperature": -0.1}, False),
    "temperature > 2": ({"model": "smollm2", "messages": CHAT, "temperature": 2.5}, False),
    "top_p 0": ({"model": "smollm2", "messages": CHAT, "top_p": 0}, False),
    "top_p > 1": ({"model": "smollm2", "messages": CHAT, "top_p": 1.5}, False),
    "top_logprobs 21": ({"model": "smollm2", "messages": CHAT, "logprobs": True, "top_logprobs": 21}, False),
    "an empty stop string": ({"model": "smollm2", "messages": CHAT, "stop": ["ok", ""]}, False),
    "stream_options without stream": ({"model": "smollm2", "messages": CHAT,
                                       "stream_options": {"include_usage": True}}, False),
    "prompt + max_tokens over the context": ({"model": "smollm2", "messages": CHAT, "max_tokens": 500}, False),
    "a prompt longer than the context": ({"model": "smollm2",
                                          "messages": [{"role": "user", "content": "word " * 600}]}, False),
}


@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_chat_requests_get_400_with_an_openai_error(server, case):
    body, raw = BAD_CHAT[case]
    r = _post(server, "chat/completions", body, raw=raw)
    assert r.status_code == 400, (case, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"]


def test_context_errors_give_both_numbers(server):
    r = _post(server, "chat/completions", {"model": "smollm2", "messages": CHAT, "max_tokens": 500})
    err = r.json()["error"]
    assert err["code"] == "exceed_context_size" and "500" in err["message"] and "512" in err["message"]
    r = _post(server, "completions", {"model": "smollm2", "prompt": "word " * 600})
    assert r.status_code == 400 and "512" in r.json()["error"]["message"]


def test_bad_completions_requests_get_400(server):
    for body in ({"model": "smollm2", "prompt": ""}, {"model": "smollm2", "prompt": "hi", "max_tokens": -1},
                 {"model": "smollm2", "prompt": "hi", "logprobs": 21}, {"model": "smollm2"},
                 {"model": "smollm2", "prompt": [999999]}):
        r = _post(server, "completions", body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_auth_is_401(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"
    for key in (None, "wrong"):
        r = _post(server, "chat/completions", {"model": "smollm2", "messages": CHAT}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200  # open without a key
    assert httpx.get(f"{server}/v1/models").status_code == 401


def test_a_full_waiting_queue_gets_429_and_the_others_finish(server):
    # tiny: one running sequence and one waiting at most: of three long requests at once, one is refused
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)

        async def one():
            try:
                r = await c.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=400, temperature=0,
                                               extra_body={"ignore_eos": True})
                return r.usage.completion_tokens
            except openai.RateLimitError as e:
                return e.body["code"]
        return await asyncio.gather(*(one() for _ in range(3)))

    results = asyncio.run(main())
    assert results.count("queue_full") >= 1 and 400 in results


# ---- SIGTERM: in-flight requests finish, new ones are refused ---------------------------------------------------
def test_sigterm_drains_in_flight_requests_and_refuses_new_ones():
    proc, url = start(["-m", "tiny=synthetic:tiny-llama3"])
    try:
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                refused = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=5)
                assert refused.status_code == 503
            except httpx.ConnectError:
                pass  # the port is closed already: refused as well
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finishes[-1] == "length"
        # uvicorn re-raises the captured SIGTERM once drained, so the exit status is the signal's (or 0)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- bench serve: the load generator against a real server ----------------------------------------------------
def test_bench_serve_reports_every_request_and_goodput(capsys):
    from infer_recipes.cli import main

    proc, url = start(["-m", "tiny=synthetic:tiny-llama3"])
    try:
        rc = main(["bench", "serve", "--url", url, "--model", "tiny", "--num-prompts", "12", "--max-concurrency", "4",
                   "--request-rate", "50", "--dataset", "random", "--input-len", "8", "--output-len", "9",
                   "--slo", "ttft=30,tpot=5", "--json"])
        report = json.loads(capsys.readouterr().out)
        assert rc == 0 and report["completed"] == 12 and report["failed"] == 0
        assert report["output_tokens"] == 12 * 9  # fixed length: end-of-sequence ignored, usage counted exactly
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            stats = report[key]
            assert 0 < stats["median"] <= stats["p99"], key
        assert report["e2e_s"]["median"] >= report["ttft_s"]["median"]
        assert report["goodput_requests_per_s"] == pytest.approx(report["requests_per_s"])  # a generous SLO
        assert main(["bench", "serve", "--url", url, "--model", "nope", "--num-prompts", "2", "--dataset", "random",
                     "--json"]) == 1  # every request refused (404): a failing run
        failed = json.loads(capsys.readouterr().out)
        assert failed["failed"] == 2 and "404" in failed["errors"][0]
    finally:
        stop(proc)
    assert main(["bench", "serve", "--url", f"http://127.0.0.1:{free_port()}", "--model", "tiny",
                 "--dataset", "random"]) == 2  # no server: one line naming it, not a traceback
    assert "no server at" in capsys.readouterr().err
