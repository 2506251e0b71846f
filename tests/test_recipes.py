"""Recipes load and validate; bad ones name the file line and key; `run` and `recipes` work; the optimizer façade."""
from __future__ import annotations

import json

import pytest

from infer_recipes import LLM, InferRecipesError, LLMInferenceOptimizer, SamplingParams, load_recipe
from infer_recipes.cli import main
from infer_recipes.recipe import SCHEMA, RecipeError, parse_recipe, shipped

EXPECTED = {f"smollm2-135m-instruct/{n}" for n in ("baseline", "int8", "w8a8", "int4", "fastest", "pp2",
                                                   "int8-kv")} | \
    {f"llama-3.2-{s}/{n}" for s in ("1b", "3b") for n in ("baseline", "optimized")} | {"llama-3.2-3b/tp2"} | \
    {f"qwen2.5-coder-{s}-instruct/{n}" for s in ("0.5b", "1.5b") for n in ("baseline", "gguf", "int8", "int4", "fastest")}

TINY_RECIPE = """\
name: tiny/test
model:
  name: synthetic:tiny-llama3
  device: cpu
optimization:
  fusion: true
  quantization: int8
scheduler:
  max_batch_size: 2
data:
  prompts: ["abc", "hello world", "x"]
  chat: false
  max_tokens: 5
"""


def test_every_shipped_recipe_loads_with_all_sections():
    assert set(shipped()) == EXPECTED
    for name, path in shipped().items():
        r = load_recipe(name)
        assert r.name == name and r.description and r.prompts()
        text = path.read_text()
        assert all(f"\n{section}:" in text for section in SCHEMA), name


@pytest.mark.parametrize("text,line,words", [
    ("model:\n  name: m\noptimization:\n  quantization: int3\n", 4, ["optimization.quantization", "int3", "int4"]),
    ("model:\n  name: m\noptimization:\n  fuse: true\n", 4, ["unknown key optimization.fuse", "fusion"]),
    ("model:\n  name: m\n  dtype: fp8\n", 3, ["model.dtype", "bfloat16"]),
    ("model:\n  name: m\nscheduler:\n  max_batch_size: 0\n", 4, ["max_batch_size", "positive"]),
    ("model:\n  name: m\noptimization:\n  group_size: 48\n", 4, ["group_size", "32, 64, 128"]),
    ("model:\n  name: m\noptimization:\n  kv_cache: maybe\n", 4, ["kv_cache", "true, false"]),
    ("model:\n  name: m\noptimization:\n  kv_cache_dtype: fp8\n", 4, ["optimization.kv_cache_dtype", "fp8", "int8"]),
    ("model:\n  name: m\nparallel:\n  tensor_parallel_size: 0\n", 4, ["parallel.tensor_parallel_size", "positive"]),
    ("model:\n  name: m\nextras:\n  a: 1\n", 3, ["unknown section 'extras'"]),
    ("model:\n  name: m\nmodel:\n  name: n\n", 3, ["appears twice"]),
    ("model:\n  name: [unclosed\n", 3, ["not valid YAML"]),
])
def test_bad_recipes_name_the_line_and_the_key(text, line, words):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "bad.yaml")
    message = str(err.value)
    assert message.startswith(f"bad.yaml line {line}:"), message
    assert all(w in message for w in words), message


def test_missing_model_name_and_unknown_recipe_are_clear():
    with pytest.raises(RecipeError, match="model.name is required"):
        parse_recipe("optimization:\n  fusion: true\n", "r.yaml")
    with pytest.raises(RecipeError, match="infer-recipes recipes"):
        load_recipe("smollm2-135m-instruct/int7")


def test_set_overrides_a_value_and_bad_overrides_are_named():
    r = load_recipe("smollm2-135m-instruct/int8", ["optimization.quantization=int4", "scheduler.max_batch_size=2",
                                                    "optimization.quantization_skip=[lm_head]"])
    assert (r.engine.quantization, r.engine.max_batch_size, r.engine.quantization_skip) == ("int4", 2, ("lm_head",))
    with pytest.raises(RecipeError, match=r"--set optimization.group_size.*48"):
        load_recipe("smollm2-135m-instruct/int8", ["optimization.group_size=48"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe("smollm2-135m-instruct/int8", ["quantization=int4"])


def test_run_command_runs_a_recipe_file(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    assert main(["run", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["recipe"] == "tiny/test" and result["prompts"] == 3 and result["max_batch_size"] == 2
    assert 3 <= result["generated_tokens"] <= 15 and len(result["outputs"]) == 3
    assert result["peak_memory_bytes"] > result["weight_bytes"] > 0
    # the same recipe through the API gives the same text
    r = load_recipe(str(path))
    llm = LLM(r.model, progress=False, **r.llm_kwargs())
    assert [o.text for o in llm.generate(r.prompts(), r.data.sampling_params())] == \
        [o["text"] for o in result["outputs"]]


def test_run_and_recipes_commands_report_bad_input(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY_RECIPE.replace("quantization: int8", "quantization: int9"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 7" in err and "optimization.quantization" in err and "Traceback" not in err
    assert main(["recipes", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == EXPECTED


def test_optimizer_facade_chains_switches_and_matches_llm():
    prompts = ["abc", "hello world"]
    opt = LLMInferenceOptimizer("synthetic:tiny-llama3", device="cpu", progress=False)
    assert not (opt.config.kv_cache or opt.config.fusion)  # starts from the original model
    out = opt.enable_kv_cache().enable_fusion().set_batch_size(8).enable_quantization(precision="int8") \
        .infer(prompts, max_tokens=6)
    assert (opt.config.kv_cache, opt.config.fusion, opt.config.quantization, opt.config.max_batch_size) == \
        (True, True, "int8", 8)
    ref = LLM("synthetic:tiny-llama3", device="cpu", quantization="int8", max_batch_size=8, progress=False)
    assert [o.token_ids for o in out] == \
        [o.token_ids for o in ref.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))]
    with pytest.raises(InferRecipesError, match="quantization"):
        opt.enable_quantization(precision="int3")


def test_optimizer_facade_answers_on_smollm2(smollm):
    opt = LLMInferenceOptimizer("smollm2-135m-instruct", device="cpu", progress=False)
    out = opt.enable_kv_cache().enable_fusion().enable_quantization("int8").infer(
        ["What is the capital of France?"], max_tokens=16, chat=True)
    assert "Paris" in out[0].text


def test_generate_takes_a_recipe_and_flags_override_it(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    assert main(["generate", "--recipe", str(path), "--quantization", "none", "-p", "abc", "--max-tokens", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = LLM("synthetic:tiny-llama3", device="cpu", progress=False).generate(
        "abc", SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert out["token_ids"] == ref.token_ids  # the flag turned the recipe's int8 off
    assert main(["generate", "--set", "optimization.fusion=false", "-p", "abc"]) == 2
    assert "--recipe" in capsys.readouterr().err
