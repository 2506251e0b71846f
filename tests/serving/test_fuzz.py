"""Property-based fuzzing of the OpenAI endpoints with `hypothesis`: a few hundred mutated bodies (wrong types,
out-of-range numbers, any Unicode including unpaired surrogates, deep nesting, long strings, unknown fields).

Whatever a body holds: the answer is a 2xx or a 4xx with OpenAI's error object (never a 500), within its deadline;
afterwards the server answers a normal request and every KV pool is back to full. Derandomized: the same bodies on
every run, so a failure reproduces."""
from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import start, stop, wait_pool_full

DEADLINE_S = 60.0
MODELS = ["tiny", "tiny", "small", "cascade", "nope", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3),
    st.text(max_size=40), st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
    st.text(max_size=3000).map(lambda s: s * 3),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
nested = st.integers(1, 60).map(lambda d: json.loads("[" * d + "]" * d))
deep_raw = st.integers(1, 200_000).map(lambda d: '{"model": "tiny", "messages": ' + "[" * d + "]" * d + "}")
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"]),
                                 "content": st.one_of(st.text(max_size=60), json_values,
                                                      st.lists(st.fixed_dictionaries(
                                                          {"type": st.sampled_from(["text", "image_url"]),
                                                           "text": st.one_of(st.text(max_size=20), json_values)}),
                                                          max_size=3))})
FIELDS = {
    "max_tokens": st.one_of(st.integers(1, 24), json_values), "temperature": st.one_of(st.floats(0, 2), json_values),
    "top_p": json_values, "n": st.one_of(st.integers(1, 4), json_values),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=5), json_values),
    "seed": st.one_of(st.integers(-2**66, 2**66), json_values), "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "logprobs": st.one_of(st.booleans(), st.integers(0, 25), json_values), "top_logprobs": json_values,
    "presence_penalty": json_values, "frequency_penalty": json_values,
    "logit_bias": st.one_of(st.dictionaries(st.integers(0, 400).map(str), st.floats(-150, 150), max_size=3),
                            json_values),
    "top_k": json_values, "min_p": json_values, "ignore_eos": st.one_of(st.booleans(), json_values),
    "user": json_values, "response_format": json_values, "tools": json_values, "tool_choice": json_values,
    "echo": json_values, "best_of": json_values, "suffix": json_values, "unknown_field": json_values,
}


@st.composite
def bodies(draw) -> tuple[str, str]:
    """(path, raw body): a valid-looking request with some of its fields replaced, or a raw oddity."""
    if draw(st.integers(0, 19)) == 0:
        raw = draw(st.one_of(st.binary(max_size=200).map(lambda b: b.decode("latin-1")), deep_raw,
                             json_values.map(json.dumps)))
        return draw(st.sampled_from(["chat/completions", "completions"])), raw
    chat = draw(st.booleans())
    body = {"model": draw(st.one_of(st.sampled_from(MODELS), json_values)), "max_tokens": 8, "ignore_eos": True}
    if chat:
        body["messages"] = draw(st.one_of(st.lists(message, min_size=1, max_size=3),
                                          st.just([{"role": "user", "content": "hi"}]), json_values, nested))
    else:
        body["prompt"] = draw(st.one_of(st.text(max_size=80), st.lists(st.integers(-5, 300), max_size=6),
                                        st.lists(st.lists(st.integers(0, 300), max_size=4), max_size=3),
                                        json_values, nested))
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        body[name] = draw(FIELDS[name])
    if draw(st.booleans()):
        body.pop(draw(st.sampled_from(sorted(body))))
    # what JSON cannot carry (NaN, infinity) goes out as the non-standard literals Python writes
    return "chat/completions" if chat else "completions", json.dumps(body, allow_nan=True)


@pytest.fixture(scope="module")
def fuzz_server():
    proc, url = start(["-m", "tiny=synthetic:tiny-llama3,max_batch_size=4,max_waiting=8",
                       "-m", "small=synthetic:tiny-llama3,quantization=int8", "--max-model-len", "256",
                       "--cascade", "cascade=tiny,small"])
    yield url
    stop(proc)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(case=bodies())
def test_no_body_gets_a_500_or_hangs(fuzz_server, case):
    path, raw = case
    try:
        r = httpx.post(f"{fuzz_server}/v1/{path}", content=raw.encode("utf-8", "surrogatepass"),
                       headers={"Content-Type": "application/json"}, timeout=DEADLINE_S)
    except httpx.TimeoutException:
        pytest.fail(f"no answer within {DEADLINE_S} s to {raw[:300]!r}")
    assert r.status_code < 500, (r.status_code, r.text[:300], raw[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:300]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e[:10] for e in events), r.text[-300:]
    else:
        assert r.json()["choices"], r.text[:300]


def test_after_the_fuzz_the_server_answers_and_the_pools_are_full(fuzz_server):
    r = httpx.post(f"{fuzz_server}/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert not math.isnan(r.json()["usage"]["total_tokens"])
    for model in ("tiny", "small"):
        wait_pool_full(fuzz_server, model)
