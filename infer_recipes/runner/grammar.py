"""Structured output: which tokens may come next so that the text keeps matching a constraint (a JSON schema, any
JSON object, a regular expression, a GBNF or Lark grammar, a choice of strings), through llguidance, a maintained
grammar engine (an Earley parser walking the tokenizer's token trie; it also skips tokens that would only ever
fail later).

One `Grammars` per model: llguidance's view of the tokenizer (built on first use, from our own tokenizer's JSON),
and each constraint compiled once and kept (least recently used out), so a request copies a compiled matcher
instead of compiling again. A request's matcher holds where its text is in the grammar: the sampler asks it which
tokens may come next (`allowed`), and the engine feeds it every token the request keeps.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import numpy as np
import torch

from ..config import Constraint
from ..errors import InferRecipesError
from ..tokenizer import LLMTokenizer

_FORMATS = {"json_schema": "json_schema", "json_object": "json_schema", "regex": "regex", "grammar": "grammar",
            "choice": "choice"}


class GrammarError(InferRecipesError):
    """A constraint the grammar engine cannot compile; the message says why."""


def grammar_text(c: Constraint) -> str:
    """llguidance's grammar definition of a constraint. JSON comes compact (no whitespace between tokens, as
    OpenAI's does) unless the schema says otherwise in llguidance's "x-guidance" key: free whitespace lets a small
    model loop on newlines until max_tokens (3 of 50 sampled SmolLM2 answers did; none compact)."""
    value = '{"type": "object"}' if c.kind == "json_object" else c.value
    if c.kind in ("json_schema", "json_object"):
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise GrammarError(f"the json schema is not valid JSON: {e}") from None
        if isinstance(schema, dict) and "x-guidance" not in schema:
            value = json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})
    try:
        return llguidance.grammar_from(_FORMATS[c.kind], value)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"the {c.kind} cannot be used: {e}") from None


class Grammars:
    def __init__(self, tokenizer: LLMTokenizer, vocab_size: int, eos_token_ids, cache_size: int = 64):
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._ll: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[Constraint, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # a server checks constraints on worker threads, the engine adds on its own

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll is None:
            self._ll = llguidance.LLTokenizer(self.tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size,
                                              eos_token=self.eos_token_ids or None)
        return self._ll

    def compiled(self, c: Constraint) -> llguidance.LLMatcher:
        """The constraint compiled (from the cache when it was before); GrammarError when it cannot be."""
        with self._lock:
            matcher = self._compiled.get(c)
            if matcher is not None:
                self._compiled.move_to_end(c)
                return matcher
            text = grammar_text(c)
            problem = llguidance.LLMatcher.validate_grammar(text, self._ll_tokenizer())
            matcher = None if problem else llguidance.LLMatcher(self._ll_tokenizer(), text)
            if matcher is None or matcher.is_error():
                why = problem or matcher.get_error()
                raise GrammarError(f"the {c.kind.replace('_', ' ')} cannot be compiled: {why}")
            self._compiled[c] = matcher
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
            return matcher

    def matcher(self, c: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for one request (a copy of the compiled one)."""
        return self.compiled(c).deep_copy()


def allowed(matcher: llguidance.LLMatcher, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bool [vocab_size]: the tokens the matcher lets come next."""
    # little-endian 32-bit words: token 32 w + b is bit b of word w, i.e. bit (t % 8) of byte t // 8
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return torch.from_numpy(bits[:vocab_size].view(np.bool_)).to(device)
