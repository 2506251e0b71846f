"""The real Qwen2.5-Coder pair from their Q4_K_M GGUF files: ours against transformers on the same file, every
quantization scheme on the 0.5B, and the 1.5B kept in its blocks (skipped where its packages are absent)."""
from __future__ import annotations

import pytest
import torch

from infer_recipes import LLM, SamplingParams, kernels
from tests.conftest import qwen_gguf

PROMPTS = ["def quicksort(arr):\n    \"\"\"Sort a list.", "The capital of France is",
           "请用一句话解释什么是机器学习。北京是中国的首都，"]
# ~230 tokens of code, English and Chinese: long enough that a top-1 agreement is more than a few positions
TEXT = ("import heapq\n\n\ndef dijkstra(graph, source):\n    \"\"\"Shortest distances from source in a graph "
        "given as {node: [(neighbour, weight), ...]}.\"\"\"\n    dist = {source: 0}\n    queue = [(0, source)]\n"
        "    while queue:\n        d, node = heapq.heappop(queue)\n        if d > dist.get(node, float('inf')):\n"
        "            continue\n        for nxt, w in graph.get(node, []):\n            nd = d + w\n"
        "            if nd < dist.get(nxt, float('inf')):\n                dist[nxt] = nd\n"
        "                heapq.heappush(queue, (nd, nxt))\n    return dist\n\n"
        "The algorithm keeps a priority queue of tentative distances and settles the closest node first, so each "
        "node is finalised once; with a binary heap it runs in O((V + E) log V) time.\n"
        "北京是中华人民共和国的首都，也是全国的政治中心和文化中心。这座城市有三千多年的建城史，"
        "故宫、天坛和长城都是世界文化遗产。每年都有大量游客来到北京参观名胜古迹，品尝北京烤鸭。")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_qwen05_logits_match_transformers(qwen05, hf_qwen05, prompt):
    hf, hf_tok = hf_qwen05
    ids = hf_tok(prompt).input_ids
    assert qwen05.tokenizer.encode(prompt) == ids
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = qwen05.logits(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("question", ["Write a Python function that checks whether a number is prime.",
                                      "用Python写一个计算斐波那契数列的函数。"])
def test_qwen05_greedy_64_tokens_match_transformers(qwen05, hf_qwen05, question):
    hf, _ = hf_qwen05
    ids = qwen05.tokenizer.encode_chat([{"role": "user", "content": question}])
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    ours = qwen05.generate(ids, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))[0].token_ids
    assert ours == ref


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_qwen_chat_template_matches_transformers(qwen05, hf_qwen05, tools):
    """ChatML with a system prompt, and with the tools branch (function schemas in the system turn)."""
    _, hf_tok = hf_qwen05
    messages = [{"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": "Hi! 你好"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "What is the weather in Paris?"}]
    ref = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert qwen05.tokenizer.apply_chat_template(messages, tools=tools) == ref
    no_system = hf_tok.apply_chat_template(messages[1:], tools=tools, add_generation_prompt=True, tokenize=False)
    assert qwen05.tokenizer.apply_chat_template(messages[1:], tools=tools) == no_system


@pytest.mark.parametrize("scheme", ["gguf", "int8", "int8-minmax", "w8a8", "int4", "int4-w8a8", "bf16"])
def test_every_scheme_runs_the_qwen05(qwen05, scheme):
    """Each scheme loads the real 0.5B (K-quant blocks: Q5_0, Q8_0, Q4_K, Q6_K) and keeps its next-token choices
    close to float32's over a code and a Chinese prompt."""
    ids = qwen05.tokenizer.encode(TEXT)
    assert len(ids) > 200
    ref = qwen05.logits(ids).argmax(-1)
    llm = LLM("qwen2.5-coder-0.5b-instruct", device="cpu", progress=False,
              **({"dtype": "bfloat16"} if scheme == "bf16" else {"dtype": "float32", "quantization": scheme}))
    agreement = (llm.logits(ids).float().argmax(-1) == ref).float().mean().item()
    # measured over 512 tokens of wiki.valid.tokens (README): gguf 0.990, int8 0.980, bf16 0.982, w8a8 0.965,
    # int4 0.844 (group-32 min-max from the dequantized file: the 0.5B suffers), int4-w8a8 0.965 (a long prompt
    # runs the w8a8 form; on our AVX2 kernels the int4 form takes every call, so it is int4's)
    int4_form = scheme == "int4" or (scheme == "int4-w8a8" and kernels.isa() == "avx2")
    floor = 0.75 if int4_form else {"w8a8": 0.85}.get(scheme, 0.9)
    assert agreement >= floor, agreement
    if scheme == "gguf":
        assert llm.weight_bytes() < 0.5 * qwen05.weight_bytes()
        q = llm.model.model.layers[11].mlp.down_proj  # Q4_K in the file: kept as int4
        assert type(q).__name__ == "Int4Linear"


def test_qwen15_kept_in_its_blocks_answers():
    qwen_gguf("qwen2.5-coder-1.5b-instruct")
    llm = LLM("qwen2.5-coder-1.5b-instruct", device="cpu", dtype="bfloat16", quantization="gguf", progress=False)
    kinds = {type(m).__name__ for m in llm.model.modules()}
    assert {"Int4Linear", "Int8Linear", "GGUFEmbedding"} <= kinds and "Linear" not in kinds
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                   SamplingParams(max_tokens=8, temperature=0.0))[0].text
    assert "Paris" in out
