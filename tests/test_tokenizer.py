"""Tokenizers against llama.cpp's reference tokenizations, transformers and sentencepiece."""
from __future__ import annotations

import pytest

from conftest import data_path
from infer_recipes.tokenizer import IncrementalDetokenizer, from_directory, from_gguf

TEXTS = ["Hello world", " Hello, World!  How's it going?\n\nFine.", "1234567 + 89 = ?",
         "北京是中国的首都，上海是最大的城市。", "混合 text 与 English 和数字 2024 年。", "emoji 🦙 and tabs\t\tend  "]


@pytest.mark.parametrize("vocab", ["llama-spm", "llama-bpe", "qwen2"])
def test_gguf_vocab_matches_llama_cpp(vocab):
    path = data_path("tokenizers", "llamacpp-vocab", f"ggml-vocab-{vocab}.gguf")
    tok = from_gguf(str(path))
    inputs = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    cases = list(zip(inputs, outputs))
    assert len(cases) >= 40
    for text, expected in cases:
        assert tok.encode(text, add_special_tokens=False) == [int(x) for x in expected.split()], repr(text)


@pytest.mark.parametrize("name", ["llama3-hf", "qwen3-hf"])
def test_tokenizer_json_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    directory = data_path("tokenizers", name)
    ours = from_directory(str(directory))
    ref = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids, text
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_sentencepiece_model_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    path = data_path("tokenizers", "llama2-spm", "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    ours = from_directory(str(tmp_path))
    ref = spm.SentencePieceProcessor(model_file=str(path))
    assert ours.bos_token == "<s>" and ours.eos_token == "</s>"
    for text in TEXTS:
        expected = [ref.bos_id()] + ref.encode(text)
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == ref.decode(expected)


def _stream(tok, ids, prompt_ids=()):
    detok = IncrementalDetokenizer(tok, list(prompt_ids))
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_never_splits_a_character(smollm, text):
    tok = smollm.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, ids, tok.encode("Say:", add_special_tokens=False))
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    if any(ord(c) > 0x3000 for c in text):  # byte-level BPE splits CJK characters across tokens
        assert any(d == "" for d in deltas[:-1])


def test_incremental_detokenization_keeps_sentencepiece_spaces():
    tok = from_gguf(str(data_path("tokenizers", "llamacpp-vocab", "ggml-vocab-llama-spm.gguf")))
    prompt = tok.encode("Q:", add_special_tokens=False)
    ids = tok.encode("Hello world, 你好", add_special_tokens=False)  # "▁Hello": the prefix space is a real space
    assert ids[0] == tok.tokenizer.token_to_id("\u2581Hello")
    assert "".join(_stream(tok, ids, prompt)) == " Hello world, 你好"
