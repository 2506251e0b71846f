"""GGUF files through the `gguf` package: metadata -> ModelConfig, tensors dequantized to float.

llama.cpp's converter renames tensors and, for the `llama` architecture, permutes the rows of the Q and K
projections so that its interleaved rotary layout works; we undo both, so a GGUF file and the Hugging Face
checkpoint it came from give the same model.
"""
from __future__ import annotations

import functools
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ModelSourceError
from .gguf_file import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


@functools.lru_cache(maxsize=4)
def open_gguf(path: str) -> GGUFFile:
    """A cached, memory-mapped `GGUFFile`, with a clear error for truncated or corrupted files."""
    try:
        return GGUFFile(path)
    except Exception as e:  # ValueError, struct.error, UnicodeDecodeError ... on bad files
        raise ModelSourceError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated "
                               "or corrupted: download or convert it again") from e


def metadata(path: str) -> dict:
    """The metadata, less the tokenizer's large arrays (read with `array_field`)."""
    return {key: value for key, value in open_gguf(path).fields.items()
            if not (key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores", "token_type",
                                                                                "merges"))}


def array_field(path: str, key: str):
    return open_gguf(path).fields.get(key)


def read_config(path: str) -> ModelConfig:
    meta = metadata(path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(f"unsupported GGUF architecture {arch!r} in {path}: supported are "
                               f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelSourceError(f"{path} lacks the metadata key {arch}.{key}: the file is incomplete")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    names = _tensors_by_name(path)
    vocab = meta.get(f"{arch}.vocab_size") or len(array_field(path, "tokenizer.ggml.tokens") or [])
    rope_scaling = None
    if "rope_freqs.weight" in names:
        rope_scaling = {"rope_type": "freq_factors", "factors": tuple(float(x) for x in _tensor(path, "rope_freqs.weight"))}
    eos = [meta.get("tokenizer.ggml.eos_token_id")]
    eos += [meta.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in names, attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=eos_ids, architecture=arch,
        name=str(meta.get("general.name", "gguf")))


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: rows (head, pair, half) -> (head, half, pair)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its data is a view of the file's memory map, so the reader (and the parsed
    metadata it holds, ~170 MB for a 49k-token vocabulary) can be dropped once config and tokenizer are read."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, ...]  # rows first, as torch holds it (the file lists the dimensions the other way round)


@functools.lru_cache(maxsize=4)
def _tensors_by_name(path: str) -> dict[str, GGUFTensor]:
    """GGUF tensor name -> tensor, and our parameter name -> tensor, in file order, for one file."""
    index = {}
    for t in open_gguf(path).tensors:
        entry = GGUFTensor(t.name, t.tensor_type, t.data, tuple(reversed(t.shape)))
        index[t.name] = entry
        if hf_name(t.name) is not None:
            index[hf_name(t.name)] = entry
    return index


def _file_tensors(path: str) -> list[GGUFTensor]:
    """Each tensor once, in file order (the index also holds each under our parameter name)."""
    return [t for key, t in _tensors_by_name(path).items() if key == t.name]


def drop_metadata(path: str) -> None:
    """Keeps only the tensor index of `path`: the reader with its parsed metadata goes."""
    _tensors_by_name(path)
    open_gguf.cache_clear()


def _tensor(path: str, name: str) -> np.ndarray:
    from gguf.quants import dequantize

    t = _tensors_by_name(path)[name]
    return dequantize(t.data, t.tensor_type)


def _rows_in_our_order(rows: np.ndarray, config: ModelConfig, name: str) -> np.ndarray:
    """Undoes the converter's Q/K row permutation (llama architecture) on float rows or whole rows of blocks."""
    if config.architecture == "llama" and ".q_proj." in name:
        return unpermute_rows(rows, config.num_heads)
    if config.architecture == "llama" and ".k_proj." in name:
        return unpermute_rows(rows, config.num_kv_heads)
    return rows


def tensor_names(path: str) -> list[str]:
    return [t.name for t in _file_tensors(path) if hf_name(t.name) is not None]


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> its shape (rows first, as torch holds it)."""
    return {hf_name(t.name): t.shape for t in _file_tensors(path) if hf_name(t.name) is not None}


def tensor_types(path: str) -> dict[str, str]:
    """Our parameter name -> its GGUF type name (F32, Q4_K, ...)."""
    return {hf_name(t.name): t.tensor_type.name for t in _file_tensors(path) if hf_name(t.name) is not None}


def iter_tensors(path: str, config: ModelConfig, keep=None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(our name, float tensor) in file order; (name, None) for the tensors `keep(name)` says stay in their
    blocks (the engine builds their modules from `quantized_blocks`, never dequantizing them)."""
    from gguf.quants import dequantize

    for t in _file_tensors(path):
        name = hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs.weight, already folded into the config
        if keep is not None and keep(name):
            yield name, None
            continue
        try:
            w = _dequantize_by_rows(t.data, t.tensor_type, dequantize)
        except Exception as e:
            raise ModelSourceError(f"cannot dequantize {t.name} ({t.tensor_type.name}) in {path}: {e}") from e
        w = np.ascontiguousarray(_rows_in_our_order(w, config, name), dtype=np.float32)
        yield name, torch.from_numpy(w if w.flags.writeable else w.copy())  # F32 tensors are read-only memmaps
        _drop_pages(t.data)


def _drop_pages(data: np.ndarray) -> None:
    """Tells the OS it may drop the file pages behind a tensor already copied out: they count as resident until
    then (96 MB for SmolLM2). Harmless if read again (they come back from the file); a no-op where unsupported."""
    root = data
    while isinstance(root.base, np.ndarray):  # the array over the whole map
        root = root.base
    mm = getattr(root.base, "obj", None)  # the memoryview's mmap
    if not isinstance(mm, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = data.ctypes.data - np.frombuffer(root.base, np.uint8, count=1).ctypes.data
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, first, start + data.nbytes - first)
    except (OSError, ValueError):
        pass


def _dequantize_by_rows(data: np.ndarray, qtype, dequantize, rows: int = 4096) -> np.ndarray:
    """float32 rows from a tensor's data, a slice at a time into one buffer: the decoder's full-size temporaries
    (several per call) would otherwise sit in memory at once for a 49k-row embedding."""
    if data.ndim < 2 or data.shape[0] <= rows:
        return dequantize(data, qtype)
    first = np.asarray(dequantize(data[:rows], qtype), dtype=np.float32)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    out[:rows] = first
    for i in range(rows, data.shape[0], rows):
        out[i:i + rows] = dequantize(data[i:i + rows], qtype)
    return out


def release_blocks(path: str, hf_param: str) -> None:
    """The file pages behind a tensor whose blocks were converted: the OS may drop them (see `_drop_pages`)."""
    t = _tensors_by_name(path).get(hf_param)
    if t is not None:
        _drop_pages(t.data)


def quantized_blocks(path: str, config: ModelConfig, hf_param: str):
    """The raw GGUF blocks behind one of our parameter names, rows in our order: (type name, uint8 [N, bytes]).
    A tied lm_head's are the embedding's. None when the checkpoint has no such tensor."""
    index = _tensors_by_name(path)
    t = index.get(hf_param)
    if t is None and hf_param == "lm_head.weight" and config.tie_word_embeddings:
        t = index.get("model.embed_tokens.weight")
    if t is None:
        return None
    # whole rows move, so the blocks inside each row stay intact
    return t.tensor_type.name, _rows_in_our_order(np.asarray(t.data), config, hf_param)
