"""Structured output through a real server and the `openai` SDK: `beta.chat.completions.parse` with a nested pydantic
model returns valid objects for every prompt (greedy and sampled), `json_object` always parses, regexes, choices and
grammars hold, streams equal their non-streamed answers, and a constraint that cannot compile is a 400."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import pytest
from pydantic import BaseModel, Field
from server_utils import start, stop

openai = pytest.importorskip("openai")

Name = Annotated[str, Field(max_length=32)]


class Country(BaseModel):
    name: Name
    code: str = Field(pattern="^[A-Z]{2}$")


class City(BaseModel):
    city: Name
    country: Country
    population: int = Field(ge=0, le=100_000_000)
    landmarks: list[Name] = Field(max_length=3)
    capital: bool


CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Perth", "Quito", "Hanoi", "Rome", "Delhi", "Seoul", "Dakar",
          "Kyiv", "Bern", "Riga", "Accra", "Doha", "Baku", "Suva", "Apia", "Male", "Lome", "Nuuk", "Cork", "Turin"]
ASKS = ["Describe {} as JSON.", "Give me the facts about the city of {}."]
PROMPTS = [ask.format(city) for city in CITIES for ask in ASKS]  # 50 varied prompts


@pytest.fixture(scope="module")
def client(smollm):  # smollm: skips when the model package is absent
    proc, url = start(["-m", "smollm2=smollm2-135m-instruct", "-m", "spec=smollm2-135m-instruct,speculative_model=ngram",
                       "--max-model-len", "1024"])
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    stop(proc)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parse_with_a_nested_model_is_valid_every_time(client, temperature):
    def ask(i_prompt):
        i, prompt = i_prompt
        return client.beta.chat.completions.parse(
            model="smollm2", messages=[{"role": "user", "content": prompt}], response_format=City,
            temperature=temperature, seed=i, max_tokens=600)

    with ThreadPoolExecutor(16) as pool:  # the server batches them
        answers = list(pool.map(ask, enumerate(PROMPTS)))
    for a in answers:
        message = a.choices[0].message
        assert a.choices[0].finish_reason == "stop", message.content
        assert isinstance(message.parsed, City)  # the SDK validated it against the model
        assert City.model_validate_json(message.content) == message.parsed


def test_json_object_always_parses(client):
    people = ["Ann", "Bob", "Carla", "Dmitri", "Eve", "Farid", "Gus", "Hana"]
    kw = dict(model="smollm2", response_format={"type": "json_object"}, max_tokens=300)
    for t in (0.0, 1.0):
        for i, who in enumerate(people):
            r = client.chat.completions.create(
                messages=[{"role": "user", "content": f"Return a JSON object with the keys name and age for a "
                           f"person called {who}."}], temperature=t, seed=i, **kw)
            choice = r.choices[0]
            if t == 0.0:  # sampled at 1.0 a 135M model may ramble on inside a valid object until max_tokens
                assert choice.finish_reason == "stop"
            if choice.finish_reason == "stop":
                assert isinstance(json.loads(choice.message.content), dict)


def test_regex_choice_and_grammar_on_completions(client):
    r = client.completions.create(model="smollm2", prompt="The year the first moon landing happened:", max_tokens=20,
                                  temperature=1.0, n=3, seed=7, extra_body={"guided_regex": r" (19|20)[0-9]{2}\."})
    assert [c.finish_reason for c in r.choices] == ["stop"] * 3
    assert all(re.fullmatch(r" (19|20)[0-9]{2}\.", c.text) for c in r.choices)
    r = client.completions.create(model="smollm2", prompt="Is the sky green? Answer:", max_tokens=10, temperature=0,
                                  extra_body={"guided_choice": [" yes", " no", " maybe"]})
    assert r.choices[0].text in (" yes", " no", " maybe")
    gbnf = 'root ::= " " digit digit? " apples"\ndigit ::= [0-9]'  # llama.cpp's grammar form
    r = client.completions.create(model="smollm2", prompt="I bought", max_tokens=10, temperature=0,
                                  extra_body={"grammar": gbnf})
    assert re.fullmatch(r" [0-9]{1,2} apples", r.choices[0].text)


def test_streamed_and_speculative_answers_equal_the_plain_one(client):
    kw = dict(messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=600, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "city",
                                                                      "schema": City.model_json_schema()}})
    full = client.chat.completions.create(model="smollm2", **kw).choices[0].message.content
    City.model_validate_json(full)
    chunks = list(client.chat.completions.create(model="smollm2", stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    spec = client.chat.completions.create(model="spec", **kw)
    assert spec.choices[0].message.content == full  # guesses the grammar forbids are rejected, the rest kept


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"guided_regex": "[0-9]+("}, "guided_regex"),
    ({"response_format": {"type": "text"}, "guided_regex": "[0-9]+("}, "guided_regex"),  # text asks nothing
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, None),
])
def test_a_constraint_that_cannot_compile_is_a_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       extra_body=body)
    err = e.value.body
    assert err["message"] and (param is None or err["param"] == param), err
