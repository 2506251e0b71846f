"""Hugging Face model directories: config.json plus one or more *.safetensors files."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..errors import ModelSourceError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "llama"}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{path} is not valid JSON ({e}): restore the file from the original checkpoint") from e


def read_config(directory: str) -> ModelConfig:
    raw = _read_json(os.path.join(directory, "config.json"))
    archs = raw.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelSourceError(f"unsupported architecture {archs or raw.get('model_type')!r} in {directory}: "
                               f"supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
    if raw.get("use_sliding_window") and arch == "qwen2":
        raise ModelSourceError("Qwen2 sliding-window attention is not supported: set use_sliding_window false")
    rope = dict(raw.get("rope_parameters") or {})  # transformers >= 5 keeps theta and scaling together
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    eos = raw.get("eos_token_id")
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        eos = _read_json(gen_path).get("eos_token_id", eos)
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    heads = raw["num_attention_heads"]
    return ModelConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"], num_heads=heads, num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=dict(scaling) if scaling else None,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos_ids, architecture=arch,
        name=os.path.basename(os.path.normpath(directory)))


def safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        names = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        names = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not names:
        raise ModelSourceError(f"no *.safetensors files in {directory}: convert the checkpoint to safetensors")
    files = [os.path.join(directory, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ModelSourceError(f"the index names shards that are missing: {', '.join(missing)}")
    return files


def count_tensors(directory: str) -> int:
    total = 0
    for path in safetensors_files(directory):
        with safe_open(path, framework="pt") as f:
            total += len(f.keys())
    return total


def iter_tensors(directory: str, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for truncated headers and bodies
            if isinstance(e, ModelSourceError):
                raise
            raise ModelSourceError(f"cannot read {path} ({e}): the file is truncated or corrupted; "
                                   "download it again") from e


def write_config(directory: str, config: ModelConfig, torch_dtype: str) -> None:
    """config.json for `config` in Hugging Face's keys: what `read_config` (and transformers) read back."""
    eos = list(config.eos_token_ids)
    name = next(n for n, arch in SUPPORTED_ARCHITECTURES.items() if arch == config.architecture)
    raw = {"architectures": [name], "model_type": config.architecture,
           "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
           "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
           "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
           "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
           "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
           "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
           "bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
           "hidden_act": "silu", "torch_dtype": torch_dtype}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)


QUANTIZATION_FILE = "quantization.json"  # beside config.json: the scheme a calibrated checkpoint was made for


def read_quantization(directory: str) -> dict | None:
    """A calibrated checkpoint's quantization.json ({"scheme", "group_size", "quantization_skip", ...}), or None
    for a plain model directory."""
    path = os.path.join(directory, QUANTIZATION_FILE)
    if not os.path.isfile(path):
        return None
    raw = _read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("scheme"), str):
        raise ModelSourceError(f"{path} names no scheme: write it again with `infer-recipes quantize`")
    return raw


class SavedCodes:
    """A checkpoint's saved int4 codes (GPTQ's, `infer-recipes quantize --gptq`): per checkpoint linear name
    (`model.layers.0.self_attn.q_proj`) its packed codes [N, K / 2] (uint8, two per byte), scales and zeros
    [N, K / group], read lazily from the file quantization.json names."""

    def __init__(self, directory: str, saved: dict):
        self.path = os.path.join(directory, saved["int4_codes"])
        self.group_size = int(saved.get("group_size", 32))
        if not os.path.isfile(self.path):
            raise ModelSourceError(f"{self.path} (the int4 codes {QUANTIZATION_FILE} names) is missing: write the "
                                   "checkpoint again with `infer-recipes quantize`")
        with safe_open(self.path, framework="pt") as f:
            self.names = set(f.keys())

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        keys = [f"{name}.{k}" for k in ("qweight", "scales", "zeros")]
        if not all(k in self.names for k in keys):
            return None
        with safe_open(self.path, framework="pt") as f:
            return tuple(f.get_tensor(k) for k in keys)


def saved_codes(directory: str) -> SavedCodes | None:
    """The int4 codes of a calibrated checkpoint in `directory`, or None when it saved none."""
    saved = read_quantization(directory)
    return SavedCodes(directory, saved) if saved and saved.get("int4_codes") else None
