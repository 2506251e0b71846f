"""How well a model calls tools through our server: 24 questions (8 that need get_weather, 8 that need add, 8 that
need no tool), asked with both tools under each `tool_choice`, through a real `infer-recipes serve` and the
`openai` SDK. Per mode: how many answers called the right function, with arguments that validate against its
schema, how many called when no tool was needed, and how many ran on to `max_tokens` (a model that keeps adding
calls). Greedy decoding, so a rerun gives the same table.

    python benchmarks/tool_calls.py --model qwen2.5-coder-0.5b-instruct
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
from pydantic import ValidationError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "serving"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from server_utils import start, stop  # noqa: E402
from test_tool_calls import TOOLS, AddArgs, WeatherArgs  # noqa: E402  (the tests' two functions)

ARGS = {"get_weather": WeatherArgs, "add": AddArgs}
QUESTIONS = (
    [("get_weather", q) for q in ["What is the weather in Paris right now?", "Is it raining in Tokyo?",
                                  "How cold is it in Oslo today?", "Do I need an umbrella in London?",
                                  "What's the temperature in Cairo in fahrenheit?", "Weather report for Lima, please.",
                                  "Is it sunny in Rome?", "How windy is Chicago now?"]]
    + [("add", q) for q in ["What is 1234 plus 4321?", "Add 7 and 35.", "I need the sum of 19 and 23.",
                            "Compute 250 + 750.", "What do 12 and 30 make together?", "Sum 999 and 1.",
                            "How much is 64 added to 36?", "Please add 5 to 8."]]
    + [(None, q) for q in ["Tell me a joke.", "Write a haiku about the sea.", "What is a Python decorator?",
                           "Hello!", "Translate 'good morning' into French.", "Who wrote Hamlet?",
                           "Explain recursion in one sentence.", "Name three primary colors."]])
MODES = {"auto": {"tool_choice": "auto"}, "required": {"tool_choice": "required"},
         "required, parallel_tool_calls false": {"tool_choice": "required", "parallel_tool_calls": False}}


def ask(client, question: str, mode: dict, max_tokens: int):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}], tools=TOOLS,
                                       temperature=0, max_tokens=max_tokens, **mode)
    return r.choices[0]


def valid(call) -> bool:
    try:
        ARGS[call.function.name].model_validate_json(call.function.arguments)
        return True
    except (KeyError, ValidationError, ValueError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--max-tokens", type=int, default=120)
    args = ap.parse_args()
    proc, url = start(["-m", f"m={args.model}", "--max-model-len", "2048"], timeout=600)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        print(f"{args.model}, greedy, max_tokens {args.max_tokens}, {len(QUESTIONS)} questions per mode")
        print("| tool_choice | needed a tool: first call right + valid | needed none: answered without a call "
              "| calls per answer (mean) | ran to max_tokens |")
        print("| --- | ---: | ---: | ---: | ---: |")
        modes = {**MODES, **{f"named {n}": {"tool_choice": {"type": "function", "function": {"name": n}}}
                             for n in ARGS}}
        for name, mode in modes.items():
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda q: ask(client, q[1], mode, args.max_tokens), QUESTIONS))
            needed = [(want, a) for (want, _), a in zip(QUESTIONS, answers) if want is not None]
            right = sum(1 for want, a in needed if a.message.tool_calls and a.message.tool_calls[0].function.name
                        == want and valid(a.message.tool_calls[0]))
            none = [a for (want, _), a in zip(QUESTIONS, answers) if want is None]
            quiet = sum(1 for a in none if not a.message.tool_calls)
            calls = sum(len(a.message.tool_calls or ()) for a in answers) / len(answers)
            cut = sum(1 for a in answers if a.finish_reason == "length")
            if name.startswith("named"):  # every answer must call that function: count valid ones over all
                target = mode["tool_choice"]["function"]["name"]
                ok = sum(1 for a in answers if a.message.tool_calls and all(
                    c.function.name == target and valid(c) for c in a.message.tool_calls))
                print(f"| {name} | all 24 answers: {ok}/24 valid calls of {target} | - | {calls:.2f} | {cut}/24 |")
                continue
            print(f"| {name} | {right}/{len(needed)} | {quiet}/{len(none)} | {calls:.2f} | {cut}/24 |")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
