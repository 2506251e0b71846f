"""The CUDA path against transformers on the same GPU: tiny random checkpoints, paged KV cache, batching.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
`python -m pytest tests/runner/test_cuda.py`."""
from __future__ import annotations

import pytest
import torch

from infer_recipes import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A small Qwen2-shaped checkpoint (GQA, biased QKV, tied embeddings) with a word-level tokenizer."""
    import tokenizers

    path = tmp_path_factory.mktemp("tiny_qwen2")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, rope_theta=1000000.0)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    t.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def hf_cuda(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda().eval()


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 would make both sides differ from each other by ~1e-3 for reasons neither owns."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (int(length),), generator=g).tolist()
            for length in torch.randint(5, 120, (n,), generator=g)]


@pytest.mark.parametrize("fusion", [True, False])
def test_logits_match_transformers_on_cuda(tiny_dir, hf_cuda, fusion):
    llm = LLM(str(tiny_dir), device="cuda", dtype="float32", progress=False, fusion=fusion)
    assert llm.device.type == "cuda"
    ids = _prompts(1)[0]
    with torch.inference_mode():
        ref = hf_cuda(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
    ours = llm.logits(ids).float().cpu()
    assert (ours - ref).abs().max().item() <= 1e-3


def test_batched_greedy_matches_transformers_on_cuda(tiny_dir, hf_cuda):
    """Eight prompts of different lengths decoded together through the paged KV cache (small blocks, so the
    block tables are long and scattered) give each prompt the tokens transformers gives it alone."""
    llm = LLM(str(tiny_dir), device="cuda", dtype="float32", progress=False, block_size=4)
    prompts = _prompts(8)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf_cuda.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, do_sample=False,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"))
        assert out.token_ids == ref[0, len(ids):].tolist()


def test_prefix_cache_on_cuda_gives_the_uncached_tokens(tiny_dir):
    """A shared prefix served from cached blocks on the GPU decodes what a cold run decodes."""
    shared = _prompts(1, seed=7)[0] * 2
    prompts = [shared + tail for tail in _prompts(4, seed=8)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    cold = LLM(str(tiny_dir), device="cuda", dtype="float32", progress=False, prefix_caching=False)
    warm = LLM(str(tiny_dir), device="cuda", dtype="float32", progress=False, prefix_caching=True, block_size=8)
    expected = [o.token_ids for o in cold.generate(prompts, params)]
    warm.generate(prompts[:1], params)  # fills the cache with the shared prefix
    assert [o.token_ids for o in warm.generate(prompts, params)] == expected
    assert warm.engine.stats()["prefix_cache_hits"] > 0


def test_bfloat16_on_cuda_agrees_with_float32(tiny_dir):
    """bfloat16 changes numerics, not the model: the next token agrees with float32 on nearly every position."""
    fp32 = LLM(str(tiny_dir), device="cuda", dtype="float32", progress=False)
    bf16 = LLM(str(tiny_dir), device="cuda", dtype="bfloat16", progress=False)
    ids = _prompts(1, seed=3)[0]
    a, b = fp32.logits(ids).float(), bf16.logits(ids).float()
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agreement >= 0.9
    assert bf16.weight_bytes() * 2 == fp32.weight_bytes()
