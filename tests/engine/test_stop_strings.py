"""Stop strings and streaming: whatever the stop strings, the deltas a stream hands out add up to the final text,
and that text is the unconstrained text cut at the first stop string (property-based, on the real SmolLM2)."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infer_recipes import SamplingParams

PROMPTS = ["The capital of France is", "List three fruits:", "中文：法国的首都是"]
BASE = dict(temperature=0.0, ignore_eos=True)
_reference: dict[str, str] = {}


def _full(smollm, prompt: str) -> str:
    if prompt not in _reference:
        _reference[prompt] = smollm.generate(prompt, SamplingParams(max_tokens=24, **BASE))[0].text
    return _reference[prompt]


@st.composite
def cases(draw):
    prompt = draw(st.sampled_from(PROMPTS))
    return prompt, draw(st.data())


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), include=st.booleans(), max_tokens=st.integers(1, 24))
def test_streamed_deltas_add_up_to_the_text_cut_at_the_first_stop(smollm, case, include, max_tokens):
    prompt, data = case
    full = _full(smollm, prompt)
    pieces = data.draw(st.lists(st.one_of(
        st.integers(0, max(0, len(full) - 1)).flatmap(lambda i: st.integers(1, 6).map(lambda n: full[i:i + n])),
        st.text(min_size=1, max_size=3)), min_size=1, max_size=3).filter(lambda s: all(s)))
    params = SamplingParams(max_tokens=max_tokens, stop=tuple(pieces), include_stop_str_in_output=include, **BASE)
    stream = smollm.stream(prompt, params)
    deltas = []
    try:
        while True:
            deltas.append(next(stream))
    except StopIteration as end:
        final = end.value
    assert "".join(deltas) == final.text
    assert final.text == smollm.generate(prompt, params)[0].text
    limited = smollm.generate(prompt, SamplingParams(max_tokens=max_tokens, **BASE))[0].text
    hits = [(limited.find(s), s) for s in pieces if limited.find(s) >= 0]
    if hits:  # the first stop string in the text generated within max_tokens ends it
        at, s = min(hits)
        assert final.text == limited[:at + len(s) if include else at] and final.finish_reason == "stop"
    else:
        assert final.text == limited
