"""A deployment file: several models (each a recipe, with overrides), cascades and serving limits, for `serve`.

    name: smollm2-dual
    models:
      - {name: smollm2, recipe: smollm2-135m-instruct/baseline}
      - {name: smollm2-int4, recipe: smollm2-135m-instruct/int4, set: [scheduler.max_batch_size=8], pin: true}
    cascade:
      - {name: auto, small: smollm2-int4, large: smollm2, threshold: -1.0}
    serving: {memory_budget: 4GiB}
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import InferRecipesError
from ..loading.source import DEFAULT_MODEL
from ..recipe import find_file, load_recipe, shipped
from .pool import ModelSpec, parse_model_arg
from .routing import DEFAULT_THRESHOLD, Cascade

DEPLOYMENTS_DIR = Path(__file__).parent.parent / "deployments"
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9, "gb": 1e9,
          "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """`4GiB`, `1500MB`, `2g` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InferRecipesError(f"memory size {text!r} is not a number with an optional unit (e.g. 4GiB, 1500MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class Deployment:
    name: str
    models: list[ModelSpec]
    cascades: list[Cascade]
    memory_budget: int | None


def shipped_deployments() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DEPLOYMENTS_DIR.glob("*.yaml"))}


def load_deployment(spec: str) -> Deployment:
    path = find_file(spec, shipped_deployments(), "deployment")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InferRecipesError(f"{path}: not valid YAML: {e}") from None
    where = str(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc["models"]:
        raise InferRecipesError(f"{where}: a deployment needs a non-empty 'models' list")
    unknown = sorted(set(doc) - {"name", "description", "models", "cascade", "serving"})
    if unknown:
        raise InferRecipesError(f"{where}: unknown key(s) {', '.join(unknown)}; known: name, description, models, "
                                f"cascade, serving")
    models = []
    for i, item in enumerate(doc["models"]):
        if not isinstance(item, dict) or not item.get("name") or not item.get("recipe"):
            raise InferRecipesError(f"{where}: models[{i}] needs 'name' and 'recipe'")
        bad = sorted(set(item) - {"name", "recipe", "set", "pin"})
        if bad:
            raise InferRecipesError(f"{where}: models[{i}] has unknown key(s) {', '.join(bad)} (name, recipe, set, pin)")
        base = path.parent / item["recipe"]
        recipe = load_recipe(str(base) if base.is_file() else item["recipe"], list(item.get("set") or []))
        models.append(ModelSpec(str(item["name"]), recipe.model, recipe.llm_kwargs(), bool(item.get("pin"))))
    names = [m.name for m in models]
    cascades = []
    for i, item in enumerate(doc.get("cascade") or []):
        if not isinstance(item, dict) or not {"name", "small", "large"} <= set(item):
            raise InferRecipesError(f"{where}: cascade[{i}] needs name, small, large (and optionally threshold)")
        threshold = item.get("threshold", DEFAULT_THRESHOLD)
        cascades.append(Cascade.parse(f"{item['name']}={item['small']},{item['large']},{threshold}", names))
    serving = doc.get("serving") or {}
    budget = serving.get("memory_budget")
    return Deployment(str(doc.get("name", path.stem)), models, cascades,
                      parse_bytes(budget) if budget is not None else None)


def recipe_spec(arg: str, base: dict, overrides: list[str] | tuple[str, ...] = ()) -> ModelSpec:
    """`[NAME=]RECIPE` as a served model: the recipe's model and switches, then `base` over them."""
    name, sep, spec = arg.partition("=")
    if not sep:
        name, spec = "", arg
    recipe = load_recipe(spec, overrides)
    return ModelSpec(name or spec, recipe.model, {**recipe.llm_kwargs(), **base})


def model_spec(arg: str, base: dict) -> ModelSpec:
    """`[NAME=]RECIPE` (a shipped recipe name or a .yaml file) or `[NAME=]SPEC[,KEY=VALUE...]` for a model."""
    name, sep, rest = arg.partition("=")
    if not sep or "," in name:
        rest = arg
    if rest in shipped() or rest.endswith((".yaml", ".yml")):
        return recipe_spec(arg, base)
    return parse_model_arg(arg, base)


def assemble(deployment: str | None = None, recipes=(), models=(), recipe_overrides=(), pins=(), cascades=(),
             memory_budget: str | None = None, base: dict | None = None) -> Deployment:
    """What `serve` serves: a deployment file's models and cascades, then `--recipe` and `--model` ones (the
    default model when none is named), with `base` engine options over every model, pins, cascades and the
    budget checked against the names."""
    base = dict(base or {})
    specs, chains, budget, name = [], [], None, "serve"
    if deployment:
        d = load_deployment(deployment)
        specs += [ModelSpec(m.name, m.model, {**m.options, **base}, m.pinned) for m in d.models]
        chains, budget, name = list(d.cascades), d.memory_budget, d.name
    specs += [recipe_spec(arg, base, recipe_overrides) for arg in recipes]
    specs += [parse_model_arg(m, base) for m in models]
    if not specs:
        specs.append(parse_model_arg(DEFAULT_MODEL, base))
    names = [s.name for s in specs]
    for pin in pins:
        if pin not in names:
            raise InferRecipesError(f"--pin {pin!r}: not a served model ({', '.join(names)})")
    for spec in specs:
        spec.pinned = spec.pinned or spec.name in pins
    chains += [Cascade.parse(c, names) for c in cascades]
    if memory_budget is not None:
        budget = parse_bytes(memory_budget)
    return Deployment(name, specs, chains, budget)
