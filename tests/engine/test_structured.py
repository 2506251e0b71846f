"""Structured output in the engine, on the real SmolLM2: every constrained greedy token is the model's best among
those the grammar allows (checked against the full-sequence logits and a separate matcher), unconstrained requests
batched beside constrained ones are untouched, guesses the grammar forbids are rejected, and bad constraints are
refused before anything runs."""
from __future__ import annotations

import json

import pytest
import torch

from infer_recipes import Constraint, SamplingParams
from infer_recipes.config import ConfigError
from infer_recipes.runner.grammar import GrammarError, allowed
from infer_recipes.runner.sampling import SampleRequest, verify

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                      "age": {"type": "integer", "minimum": 0, "maximum": 130}},
                     "required": ["name", "age"], "additionalProperties": False})


def _chat(llm, text):
    return llm.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_constrained_greedy_is_the_best_allowed_token(smollm):
    prompt = _chat(smollm, "Describe a person called Ann as JSON.")
    c = Constraint("json_schema", SCHEMA)
    out = smollm.generate(prompt, SamplingParams(max_tokens=60, temperature=0.0, constraint=c))[0]
    assert out.finish_reason == "stop" and set(json.loads(out.text)) == {"name", "age"}
    matcher = smollm.engine.grammars.matcher(c)
    logits = smollm.logits(prompt + out.token_ids)[len(prompt) - 1:]  # the logits each output token came from
    for j, token in enumerate(out.token_ids):
        ok = allowed(matcher, logits.shape[-1], logits.device)
        if matcher.is_stopped():
            break
        best = logits[j].masked_fill(~ok, float("-inf")).max()
        assert ok[token] and logits[j, token] >= best - 1e-4, j  # the best allowed (up to a float tie)
        assert matcher.consume_token(token)
    assert matcher.is_accepting()


def test_unconstrained_requests_beside_constrained_ones_are_untouched(smollm):
    free = _chat(smollm, "Write a haiku about the sea.")
    want = smollm.generate(free, SamplingParams(max_tokens=24, temperature=0.0))[0].token_ids
    c = Constraint("regex", r"(yes|no)\. [A-Z][a-z ]{3,30}\.")
    outs = smollm.generate([free, _chat(smollm, "Is water wet?"), free],
                           [SamplingParams(max_tokens=24, temperature=0.0),
                            SamplingParams(max_tokens=40, temperature=0.7, seed=1, constraint=c),
                            SamplingParams(max_tokens=24, temperature=0.0)])
    assert outs[0].token_ids == want and outs[2].token_ids == want
    assert outs[1].finish_reason == "stop" and outs[1].text.startswith(("yes. ", "no. "))


def test_verify_rejects_guesses_the_grammar_forbids(smollm):
    c = Constraint("choice", json.dumps(["yes", "no"]))
    matcher = smollm.engine.grammars.matcher(c)
    tok = smollm.tokenizer
    yes, no = tok.encode("yes", add_special_tokens=False)[0], tok.encode("no", add_special_tokens=False)[0]
    logits = torch.zeros(2, smollm.model_config.vocab_size)
    logits[0, 42] = 10.0  # the model's favourite is not allowed at all
    logits[0, no] = 1.0
    picks = verify(logits, [yes], SampleRequest(SamplingParams(temperature=0.0), None, (), matcher))
    assert [p.token for p in picks] == [no]  # the guess lost to the best allowed token
    assert not matcher.is_stopped() and matcher.consume_token(no)  # the matcher was left where it was


def test_bad_constraints_are_refused_with_the_reason(smollm):
    with pytest.raises(GrammarError, match="Invalid type"):
        smollm.generate("x", SamplingParams(constraint=Constraint("json_schema", '{"type": "objectx"}')))
    with pytest.raises(GrammarError, match="not valid JSON"):
        smollm.generate("x", SamplingParams(constraint=Constraint("json_schema", "{nope")))
    with pytest.raises(GrammarError, match="regex"):
        smollm.generate("x", SamplingParams(constraint=Constraint("regex", "[0-9]+(")))
    with pytest.raises(ConfigError, match="unknown kind"):
        Constraint("xml", "<a/>")
    with pytest.raises(ConfigError, match="empty"):
        Constraint("regex", "")
    assert not smollm.engine.has_unfinished_requests()
