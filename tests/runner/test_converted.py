"""The converted-weights cache: a quantized model is saved once, memory-mapped afterwards, computes exactly what
the fresh conversion computes, and is converted again when the file is unreadable or the switches differ."""
from __future__ import annotations

import pytest
import torch

from conftest import smollm2_gguf
from infer_recipes import LLM


@pytest.fixture
def cache(tmp_path, monkeypatch):
    smollm2_gguf()
    monkeypatch.setenv("INFER_RECIPES_CACHE", str(tmp_path))
    monkeypatch.setenv("INFER_RECIPES_CONVERTED_CACHE", "1")
    return tmp_path / "converted"


def _llm(**switches):
    return LLM("smollm2-135m-instruct", device="cpu", dtype="bfloat16", progress=False, **switches)


def test_saved_once_then_mapped_with_the_same_logits(cache):
    ids = list(range(100, 140))
    fresh = _llm(quantization="gguf")
    assert not getattr(fresh.model, "from_cache", False)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    again = _llm(quantization="gguf")
    assert again.model.from_cache
    assert torch.equal(fresh.logits(ids), again.logits(ids))
    assert again.weight_bytes() == fresh.weight_bytes()
    _llm(quantization="int8")  # another scheme: another file
    assert len(list(cache.glob("*.pt"))) == 2


def test_an_unreadable_file_is_converted_again(cache, capsys):
    _llm(quantization="int8")
    (path,) = cache.glob("*.pt")
    path.write_bytes(path.read_bytes()[:4096])  # truncated
    llm = _llm(quantization="int8")
    assert not getattr(llm.model, "from_cache", False)
    assert "unreadable" in capsys.readouterr().err
    assert _llm(quantization="int8").model.from_cache  # and saved again


def test_float_models_are_not_cached(cache):
    _llm()
    assert not cache.exists() or not list(cache.glob("*.pt"))
