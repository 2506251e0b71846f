"""Speculative decoding: greedy outputs are exactly the model's own (prompt lookup and a draft model, batched,
streamed, preempted, cut by stop strings and max_tokens), sampling keeps the model's distribution, blocks never
leak, and a draft that cannot serve the model is refused with the reason."""
from __future__ import annotations

import pytest
import torch

from infer_recipes import LLM, SamplingParams
from infer_recipes.config import ConfigError, EngineConfig
from infer_recipes.engine.speculative import PromptLookup
from infer_recipes.errors import InferRecipesError
from infer_recipes.runner.sampling import SampleRequest, verify
from tests.conftest import abort_midway, count_decode_layer_calls, qwen_gguf

# prompts whose continuations copy from them (where guesses are kept) and one that does not
PROMPTS = [
    "Copy the list exactly.\nList: apples, pears, plums, cherries, grapes, lemons, limes, figs, dates, kiwis.\n"
    "Copy: apples, pears,",
    "def area(width, height):\n    return width * height\n\n\ndef volume(width, height, depth):\n    return width *",
    "Context: The Amazon river flows through Brazil, Peru and Colombia. Question: Which countries does the Amazon "
    "flow through? Answer:",
    "Write a haiku about the sea.",
]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def _smollm(**switches) -> LLM:
    switches.setdefault("max_model_len", 1024)
    return LLM("smollm2-135m-instruct", device="cpu", dtype="float32", progress=False, **switches)


@pytest.fixture(scope="module")
def lookup():
    return _smollm(speculative_model="ngram")


def _check_accepted(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats["spec_accepted_tokens"] > 0, "no guess was ever kept: the test did not exercise speculation"
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_prompt_lookup_greedy_is_the_model_s_own(smollm, lookup):
    want = [o.token_ids for o in smollm.generate(PROMPTS, GREEDY)]
    for batch in (PROMPTS, PROMPTS[:1], PROMPTS[1:3]):  # batched and alone: guesses of different lengths per step
        got = [o.token_ids for o in lookup.generate(batch, GREEDY)]
        assert got == [want[PROMPTS.index(p)] for p in batch]
    out = lookup.generate(PROMPTS[0], GREEDY)[0]
    assert 0 < out.metrics["accepted_draft_tokens"] <= out.metrics["draft_tokens"]
    _check_accepted(lookup)


@pytest.mark.parametrize("k", [1, 5])
def test_guess_counts_and_max_tokens(smollm, k):
    llm = _smollm(speculative_model="ngram", num_speculative_tokens=k, speculative_max_rows=64)  # all guess
    for max_tokens in (1, 2, 7, 23):  # never a token past max_tokens, whatever a step keeps
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        want = [o.token_ids for o in smollm.generate(PROMPTS, params)]
        got = [o.token_ids for o in llm.generate(PROMPTS, params)]
        assert got == want and all(len(t) == max_tokens for t in got)
    _check_accepted(llm)


def test_stop_strings_and_streaming(smollm, lookup):
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=["cherries", "height"])
    want = smollm.generate(PROMPTS, params)
    got = lookup.generate(PROMPTS, params)
    assert [(o.text, o.token_ids, o.finish_reason) for o in got] == \
        [(o.text, o.token_ids, o.finish_reason) for o in want]
    assert any(o.finish_reason == "stop" for o in got)
    stream = lookup.stream(PROMPTS[0], GREEDY)
    pieces = list(stream)
    assert "".join(pieces) == smollm.generate(PROMPTS[0], GREEDY)[0].text
    assert len(pieces) < GREEDY.max_tokens  # steps that kept guesses hand out several tokens at once


def test_preemption_with_guesses(smollm):
    # 12 blocks of 16 tokens for 4 sequences of ~60: sequences are preempted and recomputed, guesses or not
    llm = _smollm(speculative_model="ngram", num_blocks=12, max_model_len=128, prefix_caching=False)
    want = [o.token_ids for o in smollm.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    assert llm.engine.stats()["preemptions"] > 0
    _check_accepted(llm)


def test_aborts_free_every_block(lookup):
    abort_midway(lookup.engine, PROMPTS, GREEDY, steps=6)
    assert not lookup.engine.proposer._index  # the lookup's per-request state goes with the request


def test_draft_model_greedy_is_the_model_s_own(smollm):
    # the pair of the issue: SmolLM2 int4 drafting for SmolLM2 (float32 here, as `smollm` is)
    llm = _smollm(speculative_model="smollm2-135m-instruct", speculative_quantization="int4")
    draft = llm.engine.proposer
    want = [o.token_ids for o in smollm.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    assert [o.token_ids for o in llm.generate(PROMPTS[2:], GREEDY)] == want[2:]  # two: rows left for guesses
    starts, execute = [], draft.runner.execute
    draft.runner.execute = lambda seqs, sampling: starts.append([s.start for s in seqs]) or execute(seqs, sampling)
    assert [o.token_ids for o in llm.generate(PROMPTS[2:], GREEDY)] == want[2:]
    del draft.runner.execute
    # prompts the draft has drafted for: their full blocks come from its prefix cache, only the rest is computed
    bs = draft.pool.block_size
    assert starts[0] == [(len(llm.tokenizer.encode(p)) - 1) // bs * bs for p in PROMPTS[2:]]
    stats = llm.engine.stats()
    assert stats["spec_accepted_tokens"] > stats["spec_draft_tokens"] / 2  # a close draft: most guesses kept
    abort_midway(llm.engine, PROMPTS, GREEDY, steps=4)
    assert draft.pool.num_free == draft.pool.num_blocks and not draft._state


def test_a_loaded_model_drafts_on_its_own_weights(smollm):
    # the served pair: an int4 SmolLM2 that also answers its own requests drafts for SmolLM2, with no second copy
    small = _smollm(quantization="int4")
    llm = _smollm(draft=small)
    assert llm.draft_runner.model is small.runner.model and llm.weight_bytes() == smollm.weight_bytes()
    assert llm.engine_config.speculative_model == small.name
    want = [o.token_ids for o in smollm.generate(PROMPTS, GREEDY)]
    own = [o.token_ids for o in small.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY)] == want[:2]  # few enough rows to guess
    assert [o.token_ids for o in small.generate(PROMPTS, GREEDY)] == own  # drafting left its own cache alone
    assert llm.engine.stats()["spec_accepted_tokens"] > 0
    with pytest.raises(InferRecipesError, match="drafts with its own weights"):
        _smollm(draft=small, speculative_quantization="int8")


def test_qwen_pair():
    path = qwen_gguf("qwen2.5-coder-1.5b-instruct")  # skips with the install line when absent
    prompts = [PROMPTS[1], "# Python: reverse a string\ndef reverse(s):"]
    alone = LLM(path, device="cpu", dtype="float32", quantization="gguf", progress=False, max_model_len=1024)
    want = [o.token_ids for o in alone.generate(prompts, GREEDY)]
    del alone
    pair = LLM(path, device="cpu", dtype="float32", quantization="gguf", progress=False, max_model_len=1024,
               speculative_model=qwen_gguf("qwen2.5-coder-0.5b-instruct"))
    assert [o.token_ids for o in pair.generate(prompts, GREEDY)] == want
    assert pair.engine.stats()["spec_accepted_tokens"] > 0


def test_a_draft_of_another_vocabulary_is_refused():
    with pytest.raises(InferRecipesError, match="vocabulary differs"):
        _smollm(speculative_model=qwen_gguf("qwen2.5-coder-0.5b-instruct"))


@pytest.mark.parametrize("bad, match", [
    (dict(num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(speculative_model="ngram", kv_cache=False), "needs the KV cache"),
    (dict(speculative_model=" "), "speculative_model"),
    (dict(speculative_quantization="int3"), "speculative_quantization"),
])
def test_bad_switches_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**bad)


def test_prompt_lookup_finds_the_latest_continuation():
    class R:  # what the lookup reads of a request
        request_id, max_len, num_computed_tokens = "r", 100, 9
        params = SamplingParams(max_tokens=50)
        output_ids: list = []
        ids = [5, 6, 7, 1, 5, 6, 8, 2, 5, 6]
        num_tokens = 10

        def tokens(self, start, count):
            return self.ids[start:start + count]

    r = R()
    PromptLookup(k=3, rows=4).propose([r])
    assert r.draft == [8, 2, 5]  # "5 6" last continued with 8 (not 7): the latest occurrence wins
    r.num_computed_tokens = 5  # not decoding: no guess
    PromptLookup(k=3, rows=4).propose([r])
    assert r.draft == []
    r.num_computed_tokens = 9
    r.ids = [5, 6, 7, 1, 5, 2, 8, 2, 4, 6]  # no 2-gram repeats: a lone token is not enough to guess
    PromptLookup(k=3, rows=4).propose([r])
    assert r.draft == []



def test_spare_rows_are_split_evenly():
    """A first guess is kept more often than a later one: spare rows go round the decoding requests, and what one
    cannot use goes to the next, never past k or the rows."""
    from infer_recipes.engine.speculative import ration

    class R:
        max_len, params, output_ids, num_tokens, num_computed_tokens = 100, SamplingParams(max_tokens=50), [], 10, 9

        def __init__(self, can: int):
            self.can = can

    def guess(r, want):
        r.draft = [7] * min(want, r.can)
        return len(r.draft)

    for rows, k, cans, want in [(6, 5, (9, 9), [2, 2]), (6, 5, (9, 9, 9), [1, 1, 1]), (6, 5, (0, 9), [0, 4]),
                                (6, 5, (1, 9, 9), [1, 1, 1]), (4, 3, (9,), [3]), (8, 5, (9, 9), [3, 3]),
                                (6, 5, (9, 9, 9, 9, 9, 9), [0] * 6), (10, 5, (9, 1, 9), [3, 1, 3])]:
        requests = [R(c) for c in cans]
        ration(requests, k, rows, guess)
        assert [len(r.draft) for r in requests] == want, (rows, k, cans)

def test_guesses_share_the_rows_of_a_step(smollm):
    llm = _smollm(speculative_model="ngram", num_speculative_tokens=3)  # rows: 4
    engine = llm.engine
    for p in PROMPTS[:3]:
        engine.add_request(p, GREEDY)
    schedule, steps = engine.scheduler.schedule, []
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]  # records what each step ran
    while engine.has_unfinished_requests():
        engine.step()
    del engine.scheduler.schedule
    rows = []
    for step in steps:
        decodes = [s for s in step.scheduled if s.start and s.sample]
        rows.append(sum(s.num_tokens for s in decodes))
        assert rows[-1] <= max(4, len(decodes))  # three decodes: 4 rows, one of them a guess
    assert max(rows) == 4 and engine.stats()["spec_accepted_tokens"] > 0


def test_verify_keeps_the_distribution():
    """Rejection sampling with a deterministic guess: the token drawn at the first position follows p exactly,
    whatever the guess (a guess the model likes, one it does not, one outside top-k)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 8) * 2
    params = SamplingParams(temperature=0.8, top_k=6)
    probs = torch.softmax(logits[0] / 0.8, dim=-1)
    kth = probs.topk(6).values[-1]
    probs = torch.where(probs >= kth, probs, 0.0)
    probs /= probs.sum()
    n = 20000
    for guess in (int(probs.argmax()), int(probs.argsort()[3]), int(probs.argmin())):
        gen = torch.Generator().manual_seed(1234 + guess)
        counts = torch.zeros(8)
        for _ in range(n):
            counts[verify(logits, [guess], SampleRequest(params, gen, ()))[0].token] += 1
        expected = probs * n
        seen = expected > 0
        assert counts[~seen].sum() == 0  # nothing outside top-k, even when the guess was
        chi2 = float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())
        assert chi2 < 25.0, (guess, chi2)  # 5 degrees of freedom: p < 1e-4 under the null


def test_verify_greedy_with_penalties_sees_the_kept_guesses():
    # a frequency penalty at the second position counts the first guess, as plain decoding would have
    logits = torch.zeros(3, 4)
    logits[:, 2] = 1.0
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    picks = verify(logits, [2, 2], SampleRequest(params, None, ()))
    assert [p.token for p in picks] == [2, 0]  # 2 kept, then 2 costs 1 - 2 < 0: the argmax moves to id 0


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_a_draft_is_scored_as_decoding_scores_it(smollm, kernels, monkeypatch):
    """A step with guesses runs them as decode rows (each reading the pool up to its own position), so its logits
    are those of decoding the same tokens one step at a time, within float reordering, and every layer takes the
    decode path: with our kernels, one `decode_layer` call per layer for the whole draft (none where the extension
    does not run here, when `native` falls back to torch's kernels)."""
    from infer_recipes import kernels as extension
    from infer_recipes.runner import StepSeq

    native = extension.wanted(kernels, torch.device("cpu"))
    llm = _smollm(kernels=kernels, prefix_caching=False)
    runner, layers = llm.engine.runner, llm.model_config.num_layers
    ids = llm.tokenizer.encode(PROMPTS[1])
    table = list(range((len(ids) + 8) // runner.block_size + 1))
    guesses = llm.tokenizer.encode(" height * depth")[:4]
    last = runner.run("execute", [StepSeq(ids, 0, table, True)]).argmax(-1).tolist()
    one_by_one = torch.cat([runner.run("execute", [StepSeq([t], len(ids) + i, table, True)])
                            for i, t in enumerate(last + guesses)])
    calls = count_decode_layer_calls(monkeypatch) if native else []
    seq = StepSeq(last + guesses, len(ids), table, True, draft=len(guesses))
    assert runner._inputs([seq])[2].parts.num_decodes == len(guesses) + 1
    at_once = runner.run("execute", [seq])
    assert at_once.shape == one_by_one.shape
    torch.testing.assert_close(at_once, one_by_one, atol=2e-4, rtol=1e-4)
    assert torch.equal(at_once.argmax(-1), one_by_one.argmax(-1))
    assert len(calls) == (layers if native else 0)
