"""Tool calling on Qwen2.5-Coder-0.5B-Instruct through a real server and the `openai` SDK (calls parsed from the
model's own syntax, `tool_choice` named and required enforced by a grammar, streamed calls reassembling into the
non-streamed ones, the result sent back), LangChain's `ChatOpenAI` pointed at the same server, and the parser that
turns the model's text into calls, fed whole or piece by piece."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from server_utils import start, stop

from infer_recipes.serving.tool_calls import ToolCallParser, message
from tests.conftest import qwen_gguf

openai = pytest.importorskip("openai")


class WeatherArgs(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"] = "celsius"


class AddArgs(BaseModel):
    a: int
    b: int


def _tool(name: str, description: str, args: type[BaseModel]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": args.model_json_schema()}}


WEATHER = _tool("get_weather", "Get the current weather in a city", WeatherArgs)
ADD = _tool("add", "Add two integers", AddArgs)
TOOLS = [WEATHER, ADD]
ADD_CHOICE = {"type": "function", "function": {"name": "add"}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def server():
    qwen_gguf("qwen2.5-coder-0.5b-instruct")  # skips when the package is absent
    proc, url = start(["-m", "qwen=qwen2.5-coder-0.5b-instruct", "-m", "smollm2=smollm2-135m-instruct",
                       "--max-model-len", "2048"])
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def _args(call) -> dict:
    return json.loads(call.function.arguments)


# ---- the openai SDK --------------------------------------------------------------------------------------------
RESULT = {"city": "Paris", "temperature_c": 17.5, "sky": "overcast"}


def _round_trip(client, model: str, second: dict):
    """The model calls get_weather; the client sends the result back beside the SDK's own message object."""
    first = client.chat.completions.create(model=model, messages=ASK_WEATHER, tools=TOOLS, temperature=0,
                                           max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and WeatherArgs.model_validate(_args(call)).city == "Paris"
    messages = [*ASK_WEATHER, choice.message, {"role": "tool", "tool_call_id": call.id, "content": json.dumps(RESULT)}]
    return call, messages, client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                          max_tokens=60, **second)


def test_a_round_trip_renders_the_call_and_its_result_for_the_model(client, server):
    call, messages, second = _round_trip(client, "qwen", {"tools": TOOLS})
    assert second.choices[0].message.tool_calls or second.choices[0].message.content
    # what the model read: its own call and the result, in its template's syntax (the 0.5B does not go on to
    # answer in words: it calls again or echoes the result; the 1.5B answers, below)
    as_json = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages]
    ids = httpx.post(f"{server}/tokenize", json={"model": "qwen", "messages": as_json, "tools": TOOLS}).json()
    prompt = httpx.post(f"{server}/detokenize", json={"model": "qwen", "tokens": ids["tokens"]}).json()["prompt"]
    assert ids["count"] == second.usage.prompt_tokens
    assert (f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(_args(call))}}}\n</tool_call>'
            in prompt)
    assert f"<tool_response>\n{json.dumps(RESULT)}\n</tool_response>" in prompt


def test_the_1_5b_answers_from_the_tool_result():
    qwen_gguf("qwen2.5-coder-1.5b-instruct")  # skips without the 1.5B (make qwen)
    proc, url = start(["-m", "qwen15=qwen2.5-coder-1.5b-instruct", "--max-model-len", "2048"])
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        _, _, second = _round_trip(client, "qwen15", {"tools": TOOLS, "tool_choice": "none"})
    finally:
        stop(proc)
    answer = second.choices[0]
    assert answer.finish_reason == "stop" and answer.message.tool_calls is None
    assert "17.5" in answer.message.content and "overcast" in answer.message.content, answer.message.content


PROMPTS = ["What is 1234 plus 4321?", "Add 7 and 35.", "I need the sum of 19 and 23.", "What's the weather in Oslo?",
           "Tell me a joke.", "Compute 2 + 2 for me.", "How much is 100 and 250 together?", "Hello!"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_named_tool_choice_always_gives_valid_arguments(client, temperature):
    # even where the question is about something else, the named function is called with arguments that
    # validate against its schema
    def ask(i_prompt):
        i, prompt = i_prompt
        return client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": prompt}],
                                              tools=TOOLS, tool_choice=ADD_CHOICE,
                                              temperature=temperature, seed=i, max_tokens=60)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # the server batches them
        answers = list(pool.map(ask, enumerate(PROMPTS)))
    for r in answers:
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls  # a named function: one call
        assert call.function.name == "add"
        AddArgs.model_validate_json(call.function.arguments)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_some_tool_and_stops(client, parallel):
    r = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Tell me a joke."}],
                                       tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                                       temperature=0, max_tokens=100)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    calls = r.choices[0].message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    for call in calls:
        {"get_weather": WeatherArgs, "add": AddArgs}[call.function.name].model_validate_json(call.function.arguments)


@pytest.mark.parametrize("choice", [{"tool_choice": "auto"}, {"tool_choice": "required"}, {"tool_choice": ADD_CHOICE}])
def test_streamed_tool_calls_reassemble_into_the_non_streamed_ones(client, choice):
    kw = dict(model="qwen", messages=[{"role": "user", "content": "Add 1234 and 4321."}], tools=TOOLS,
              temperature=0, max_tokens=80, **choice)
    full = client.chat.completions.create(**kw).choices[0]
    calls, content, finish, deltas = {}, "", None, 0
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for part in delta.tool_calls or ():
            deltas += 1
            if part.id is not None:  # a call's first delta: its id and name
                calls[part.index] = {"name": part.function.name, "arguments": part.function.arguments or ""}
            else:
                calls[part.index]["arguments"] += part.function.arguments
    assert full.message.tool_calls and finish == full.finish_reason == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                for c in full.message.tool_calls]
    assert (content or None) == full.message.content
    assert deltas > len(calls)  # the arguments came in pieces, not whole at the end


def test_tool_choice_none_and_no_tools_answer_in_text(client):
    for extra in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        r = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Say hi."}],
                                           temperature=0, max_tokens=20, **extra)
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


@pytest.mark.parametrize("body, param, words", [
    ({"model": "smollm2", "tools": TOOLS}, "tools", "no tools branch"),  # SmolLM2's template ignores tools
    ({"model": "qwen", "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "tool_choice", "not among the tools"),
    ({"model": "qwen", "tool_choice": "required"}, "tool_choice", "no tools were given"),
    ({"model": "qwen", "tools": [WEATHER, WEATHER]}, "tools", "share a name"),
    ({"model": "qwen", "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "cannot be combined"),
    ({"model": "qwen", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
      "tool_choice": "required"}, "tools", "cannot be compiled"),
    ({"model": "qwen", "tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "pattern"),
    ({"model": "qwen", "messages": [*ASK_WEATHER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}]}]},
     "messages", "JSON"),
    ({"model": "qwen", "messages": [*ASK_WEATHER, {"role": "tool", "content": "18 C"}]}, "messages",
     "tool_call_id"),
    ({"model": "qwen", "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages",
     "only assistant"),
])
def test_bad_tool_requests_are_400s_that_say_why(client, body, param, words):
    body = {"messages": ASK_WEATHER, "max_tokens": 5, **body}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    err = e.value.body
    assert err["param"] == param and words in err["message"], err


# ---- LangChain's ChatOpenAI on our server ----------------------------------------------------------------------
class Capital(BaseModel):
    country: str = Field(max_length=40)
    capital: str = Field(max_length=40)


def test_langchain_chat_openai_invokes_streams_and_structures(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model="qwen", base_url=f"{server}/v1", api_key="none", temperature=0,
                                      max_tokens=40, max_retries=0)
    answer = llm.invoke("What is the capital of France? Answer in one word.")
    assert "Paris" in answer.content
    streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France? Answer in one word."))
    assert streamed == answer.content
    capital = llm.with_structured_output(Capital).invoke("Which city is the capital of Italy?")
    assert isinstance(capital, Capital) and capital.capital == "Rome"
    call = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Lima?").tool_calls[0]
    assert call["name"] == "get_weather" and WeatherArgs.model_validate(call["args"]).city == "Lima"


# ---- the parser, fed whole and piece by piece ------------------------------------------------------------------
NAMES = frozenset({"get_weather", "add"})
TEXTS = {
    "text": ("Hello there\n", "Hello there\n", []),
    "tagged": ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', None,
               [("add", '{"a": 1, "b": 2}')]),
    "tagged, then a newline": ('<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>\n', None, [("add", "{}")]),
    "text, then two tagged calls": (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"}{", "x": [1, {}]}}\n'
        '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>', "Sure.",
        [("get_weather", '{"city": "Paris \\"}{", "x": [1, {}]}'), ("add", "{}")]),
    "arguments first": ('<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>', None,
                        [("add", '{"a": 1}')]),
    "a block that is no call": ("<tool_call>\nnot json\n</tool_call> tail", "<tool_call>\nnot json\n</tool_call> tail",
                                []),
    "cut short": ('<tool_call>\n{"name": "add", "arguments": {"a": 1', None, [("add", '{"a": 1')]),
    "a partial tag": ("a <tool_ca", "a <tool_ca", []),
    "bare": ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    "bare, fenced, then text": ('```json\n{\n  "name": "add",\n  "arguments": {"a": 1, "b": 2}\n}\n```\nDone.',
                                "Done.", [("add", '{"a": 1, "b": 2}')]),
    "two bare calls": ('{"name": "add", "arguments": {"a": 1}}\n{"name": "add", "arguments": {"a": 2}}', None,
                       [("add", '{"a": 1}'), ("add", '{"a": 2}')]),
    "bare, not a tool of ours": ('{"name": "other", "arguments": {}}', '{"name": "other", "arguments": {}}', []),
    "JSON that is no call": ('{"a": 1}', '{"a": 1}', []),
    "a code fence": ("```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
}


def _parsed(text: str, cuts: list[int]) -> dict:
    parser, deltas, at = ToolCallParser(NAMES), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        deltas += parser.feed(text[at:cut])
        at = max(at, cut)
    return message(deltas + parser.finish())


@pytest.mark.parametrize("name", list(TEXTS))
@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=30))
def test_the_parser_gives_the_same_message_fed_whole_or_in_pieces(name, cuts):
    text, content, calls = TEXTS[name]
    got = _parsed(text, [c for c in cuts if c < len(text)])
    assert got["content"] == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got.get("tool_calls", [])] == calls
    assert len({c["id"] for c in got.get("tool_calls", [])}) == len(calls)
