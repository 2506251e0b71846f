"""Recipes: one YAML file that reproduces one deployment (model, optimizations, parallel, scheduler, data).

    model:        name (a model spec, as `--model` takes it), dtype, device, max_model_len
    optimization: kv_cache, prefix_caching, fusion, compile, quantization, quantization_skip, group_size, kernels
    parallel:     tensor_parallel_size, pipeline_parallel_size
    scheduler:    max_batch_size
    data:         prompts, prompts_file, chat, max_tokens, temperature, top_p, top_k, seed, ignore_eos

Shipped recipes live in the package under `recipes/<model>/<name>.yaml` and are named `<model>/<name>`.
Every error names the file, the line, the key and what is allowed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from .config import (DEVICES, DTYPES, GROUP_SIZES, KERNELS, KV_CACHE_DTYPES, QUANTIZATIONS, ConfigError, EngineConfig,
                     SamplingParams)
from .errors import InferRecipesError

RECIPES_DIR = Path(__file__).with_name("recipes")


class RecipeError(InferRecipesError):
    """A recipe that cannot be read or has a bad key or value."""


@dataclass(frozen=True)
class DataConfig:
    """What a recipe runs on when run on its own: prompts and how to sample them."""

    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    chat: bool = True
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, ignore_eos=self.ignore_eos)

    def load_prompts(self, base: Path | None = None) -> list[str]:
        prompts = list(self.prompts)
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_absolute() and base is not None:
                path = base / path
            if not path.is_file():
                raise RecipeError(f"data.prompts_file: {path} does not exist (one prompt per line)")
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return prompts


# key -> (type, allowed values or None, help); `None` in a type tuple means the key may be null
_ENGINE_KEYS = {f.name for f in fields(EngineConfig)}
SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {
        "name": ((str,), None, "a model spec: directory, .gguf file, alias or synthetic:<preset>"),
        "dtype": ((str,), DTYPES, ""),
        "device": ((str,), DEVICES, ""),
        "max_model_len": ((int, type(None)), None, "context window (null: the model's)"),
    },
    "optimization": {
        "kv_cache": ((bool,), (True, False), ""),
        "kv_cache_dtype": ((str,), KV_CACHE_DTYPES, "what the KV cache stores (auto: the activation dtype)"),
        "prefix_caching": ((bool, type(None)), (True, False), "reuse cached KV blocks of shared prefixes (null: "
                           "on where exact)"),
        "fusion": ((bool,), (True, False), ""),
        "compile": ((bool,), (True, False), ""),
        "quantization": ((str, type(None)), ("none",) + tuple(q for q in QUANTIZATIONS if q), ""),
        "quantization_skip": ((list,), None, "module-name patterns kept in float"),
        "group_size": ((int,), GROUP_SIZES, ""),
        "kernels": ((str,), KERNELS, "quantized linears on our own CPU kernels (native, where they run) or torch's"),
        "speculative_model": ((str, type(None)), None, "speculative decoding: ngram (prompt lookup) or a draft "
                              "model with the same tokenizer"),
        "num_speculative_tokens": ((int, type(None)), None, "guesses per step (null: 5 for ngram, 3 for a model)"),
        "speculative_quantization": ((str, type(None)), ("none",) + tuple(q for q in QUANTIZATIONS if q),
                                     "the draft model's scheme (null: the model's)"),
        "speculative_max_rows": ((int, type(None)), None, "decoding positions a step verifies at most (null: "
                                 "guesses + 1)"),
    },
    "parallel": {
        "tensor_parallel_size": ((int,), None, "ranks splitting each layer (heads, MLP, vocabulary)"),
        "pipeline_parallel_size": ((int,), None, "ranks holding contiguous layer stages"),
    },
    "scheduler": {
        "max_batch_size": ((int,), None, "sequences run together"),
        "max_num_batched_tokens": ((int,), None, "tokens per step (chunked-prefill budget)"),
        "max_waiting": ((int,), None, "queued requests at most"),
        "block_size": ((int,), None, "tokens per KV block"),
        "num_blocks": ((int, type(None)), None, "KV blocks (null: from kv_cache_memory)"),
        "kv_cache_memory": ((int, float, type(None)), None, "fraction of device memory for the KV pool"),
    },
    "data": {
        "prompts": ((list,), None, "a list of prompts"),
        "prompts_file": ((str, type(None)), None, "one prompt per line; relative to the recipe"),
        "chat": ((bool,), (True, False), "wrap prompts in the model's chat template"),
        "max_tokens": ((int,), None, ""),
        "temperature": ((int, float), None, ""),
        "top_p": ((int, float), None, ""),
        "top_k": ((int,), None, ""),
        "seed": ((int, type(None)), None, ""),
        "ignore_eos": ((bool,), (True, False), "generate max_tokens always (for benchmarks)"),
    },
}
TOP_KEYS = ("name", "description", *SCHEMA)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model: str
    engine: EngineConfig
    data: DataConfig = DataConfig()
    path: Path | None = None
    stated: frozenset[str] = frozenset()  # the engine keys the recipe (or --set) gave

    def llm_kwargs(self) -> dict:
        """Keyword arguments for `LLM(self.model, **kwargs)`. The quantization keys the recipe leaves out stay
        out: a calibrated checkpoint then runs in the scheme it was made for."""
        kwargs = asdict(self.engine)
        for key in ("quantization", "group_size", "quantization_skip"):
            if key not in self.stated:
                kwargs.pop(key)
        return kwargs

    def prompts(self) -> list[str]:
        return self.data.load_prompts(self.path.parent if self.path else None)


# ---- reading ------------------------------------------------------------------------------------------------------
def _located(node: yaml.Node, where: str) -> tuple[object, dict[str, int]]:
    """A composed YAML node -> (plain value, {dotted key: 1-based line})."""
    lines: dict[str, int] = {}

    def build(n: yaml.Node, path: str):
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                key = yaml.safe_load(yaml.serialize(k)) if not isinstance(k, yaml.ScalarNode) else k.value
                dotted = f"{path}.{key}" if path else str(key)
                if key in out:
                    raise RecipeError(f"{where} line {k.start_mark.line + 1}: {dotted} appears twice")
                lines[dotted] = k.start_mark.line + 1
                out[key] = build(v, dotted)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v, path) for v in n.value]
        return yaml.safe_load(yaml.serialize(n))

    return build(node, ""), lines


def _check(section: str, key: str, value, where: str, line: int | None) -> None:
    at = f"{where} line {line}" if line else where
    spec = SCHEMA[section].get(key)
    if spec is None:
        raise RecipeError(f"{at}: unknown key {section}.{key}; known keys in {section}: "
                          f"{', '.join(SCHEMA[section])}")
    types, allowed, hint = spec
    ok_type = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok_type or (allowed is not None and value not in allowed and not (value is None and type(None) in types)):
        choices = ", ".join("true" if a is True else "false" if a is False else str(a) for a in allowed) if allowed \
            else " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise RecipeError(f"{at}: {section}.{key} = {value!r} is not allowed; allowed: {choices}"
                          + (f" ({hint})" if hint else ""))


def parse_recipe(text: str, where: str = "<recipe>", path: Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Reads and validates a recipe; `overrides` are `section.key=value` strings (YAML values) applied on top."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if node is None:
        raise RecipeError(f"{where}: the recipe is empty; it needs at least model.name")
    doc, lines = _located(node, where)
    if not isinstance(doc, dict):
        raise RecipeError(f"{where} line 1: a recipe is a mapping with sections {', '.join(SCHEMA)}")
    for key, value in doc.items():
        if key not in TOP_KEYS:
            raise RecipeError(f"{where} line {lines.get(key)}: unknown section {key!r}; known: {', '.join(TOP_KEYS)}")
        if key in SCHEMA and not isinstance(value, dict):
            raise RecipeError(f"{where} line {lines.get(key)}: section {key} must be a mapping of keys to values")
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        section, _, key = dotted.strip().partition(".")
        if not sep or section not in SCHEMA or not key:
            raise RecipeError(f"--set {item!r}: expected section.key=value with a section among "
                              f"{', '.join(SCHEMA)}, e.g. optimization.quantization=int8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        doc.setdefault(section, {})[key] = value
        lines.pop(f"{section}.{key}", None)  # an override has no line: errors name the --set instead
    for section in SCHEMA:
        for key, value in (doc.get(section) or {}).items():
            line = lines.get(f"{section}.{key}")
            _check(section, key, value, where if line else f"{where} (--set {section}.{key})", line)

    model = doc.get("model", {})
    if not model.get("name"):
        raise RecipeError(f"{where}: model.name is required (a directory, .gguf file, alias or synthetic:<preset>)")
    opt, sched, data = doc.get("optimization", {}), doc.get("scheduler", {}), doc.get("data", {})
    engine_values = {**{k: v for k, v in model.items() if k in _ENGINE_KEYS}, **opt, **sched,
                     **doc.get("parallel", {})}
    if "quantization_skip" in engine_values:
        engine_values["quantization_skip"] = tuple(engine_values["quantization_skip"])
    try:
        engine = EngineConfig(**engine_values)
        data_cfg = DataConfig(**{**data, "prompts": tuple(str(p) for p in data.get("prompts", ()))})
        data_cfg.sampling_params()
    except ConfigError as e:
        field_name = str(e).split(":", 1)[0]
        section = next((s for s in SCHEMA if field_name in SCHEMA[s]), "")
        line = lines.get(f"{section}.{field_name}")
        raise RecipeError(f"{where}{f' line {line}' if line else ''}: {section}.{e}") from None
    name = doc.get("name") or (path.stem if path else "recipe")
    return Recipe(name=str(name), description=str(doc.get("description", "")).strip(), model=str(model["name"]),
                  engine=engine, data=data_cfg, path=path, stated=frozenset(engine_values))


def shipped() -> dict[str, Path]:
    """{"<model>/<name>": path} for every recipe in the package."""
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(RECIPES_DIR.glob("*/*.yaml"))}


def find_file(spec: str, catalogue: dict[str, Path], what: str, hint: str = "") -> Path:
    """`spec` as a file path, else as a name in `catalogue` (shipped files); an error lists the names."""
    path = Path(spec)
    if path.is_file():
        return path
    found = catalogue.get(spec.removesuffix(".yaml"))
    if found is None:
        raise RecipeError(f"no {what} {spec!r}: not a file, nor a shipped {what}{hint} "
                          f"({', '.join(catalogue) or 'none'})")
    return found


def load_recipe(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe by path (`my.yaml`) or shipped name (`smollm2-135m-instruct/int8`)."""
    path = find_file(spec, shipped(), "recipe", "; `infer-recipes recipes` lists them")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    return parse_recipe(text, str(path), path, overrides)
