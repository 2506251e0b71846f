"""The GGUF reader on the real SmolLM2 file: its metadata as a ModelConfig, its tensors as our parameters
(llama.cpp's names and Q/K row permutation undone), its quantized blocks in our row order, bad files refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import smollm2_gguf
from infer_recipes.errors import ModelSourceError
from infer_recipes.loading import gguf as reader


@pytest.fixture(scope="module")
def path():
    return smollm2_gguf()


def test_metadata_becomes_the_model_config(path):
    c = reader.read_config(path)
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 9, 3, 64)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and not c.attention_bias
    assert c.eos_token_ids and c.max_position_embeddings == 8192


def test_blocks_in_our_row_order_dequantize_to_the_tensors_we_load(path):
    from gguf.quants import dequantize

    config = reader.read_config(path)
    wanted = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.0.mlp.down_proj.weight"}
    loaded = {n: t for n, t in reader.iter_tensors(path, config) if n in wanted}
    assert set(loaded) == wanted
    for name, tensor in loaded.items():
        qtype, blocks = reader.quantized_blocks(path, config, name)
        assert qtype == "Q4_1" and blocks.dtype == np.uint8 and blocks.shape[0] == tensor.shape[0]
        import gguf

        floats = dequantize(blocks, gguf.GGMLQuantizationType[qtype])
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(floats, dtype=np.float32)), tensor)
    # the Q rows really were permuted back: llama.cpp's interleaved order differs from ours
    raw = reader._tensors_by_name(path)["blk.0.attn_q.weight"]
    assert not torch.equal(torch.from_numpy(dequantize(raw.data, raw.tensor_type).astype(np.float32)),
                           loaded["model.layers.0.self_attn.q_proj.weight"])
    assert reader.hf_name("blk.3.ffn_gate.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert reader.hf_name("rope_freqs.weight") is None


def test_a_truncated_file_is_a_clear_error(path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(1_000_000))
    with pytest.raises(ModelSourceError, match="truncated or corrupted"):
        reader.read_config(str(cut))


@pytest.mark.parametrize("which", ["smollm2", "qwen2.5-coder-0.5b-instruct"])
def test_our_header_reader_reads_what_gguf_reads(which):
    """Every metadata value and every tensor (name, type, shape, bytes) as `gguf.GGUFReader` reads them."""
    import gguf

    from conftest import qwen_gguf
    from infer_recipes.loading.gguf_file import GGUFFile

    file = smollm2_gguf() if which == "smollm2" else qwen_gguf(which)
    ours, ref = GGUFFile(file), gguf.GGUFReader(file)
    fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert fields.keys() == ours.fields.keys()
    for key, value in fields.items():
        if isinstance(value, list) and value and isinstance(value[0], float):
            assert np.allclose(value, ours.fields[key]), key
        else:
            assert value == ours.fields[key], key
    assert [t.name for t in ref.tensors] == [t.name for t in ours.tensors]
    for a, b in zip(ref.tensors, ours.tensors):
        assert (a.tensor_type, tuple(int(d) for d in a.shape)) == (b.tensor_type, b.shape)
        assert a.data.shape == b.data.shape and np.array_equal(np.asarray(a.data), b.data), a.name


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelSourceError, match="not a readable GGUF file"):
        reader.read_config(str(bad))
