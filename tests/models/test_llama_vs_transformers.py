"""Our model against Hugging Face transformers, the reference implementation."""
from __future__ import annotations

import json

import pytest
import torch

from infer_recipes import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.",
           "北京是中国的首都，也是一座历史悠久的城市。"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_logits_match_transformers(smollm, hf_smollm, prompt):
    hf, hf_tok = hf_smollm
    ids = hf_tok(prompt, add_special_tokens=True).input_ids
    assert smollm.tokenizer.encode(prompt) == ids
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = smollm.logits(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-3


def test_smollm2_greedy_64_tokens_match_transformers(smollm, hf_smollm):
    hf, _ = hf_smollm
    ids = smollm.tokenizer.encode_chat([{"role": "user", "content": "Write a long story about a dragon."}])
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
    ours = smollm.generate(ids, SamplingParams(max_tokens=64, temperature=0.0))[0].token_ids
    assert len(ours) == 64
    assert ours == ref


def test_chat_template_matches_transformers(smollm, hf_smollm):
    _, hf_tok = hf_smollm
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 你好"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]
    ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert smollm.tokenizer.encode_chat(messages) == list(ref)


def _save_tiny(tmp_path, kind: str, shard: bool = False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama3":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random init leaves biases at zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB" if shard else "10GB")
    return model


@pytest.mark.parametrize("kind,shard", [("llama3", False), ("llama3", True), ("qwen2", False)])
def test_tiny_hf_directory_matches_transformers(tmp_path, kind, shard):
    ref_model = _save_tiny(tmp_path, kind, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    raw = json.loads((tmp_path / "config.json").read_text())
    # positions past original_max_position_embeddings exercise the llama3 frequency scaling
    ids = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = ref_model(ids).logits[0]
    tok = __import__("tokenizers")
    t = tok.Tokenizer(tok.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    t.save(str(tmp_path / "tokenizer.json"))
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", progress=False)
    assert llm.model_config.architecture == ("qwen2" if kind == "qwen2" else "llama")
    assert llm.model_config.attention_bias == (kind == "qwen2")
    assert raw["tie_word_embeddings"] == llm.model_config.tie_word_embeddings
    ours = llm.logits(ids[0].tolist())
    assert (ours - ref).abs().max().item() <= 1e-4
