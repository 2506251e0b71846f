"""`infer-recipes tune`: the choice obeys the budget and the speed ratios, the written recipe reproduces the chosen
row, and each row's perplexity is the one `eval perplexity` measures for that configuration."""
from __future__ import annotations

import json

import pytest
from conftest import data_path

from infer_recipes import LLM
from infer_recipes.cli import main
from infer_recipes.errors import InferRecipesError
from infer_recipes.eval.perplexity import perplexity
from infer_recipes.eval.tune import (Settings, _check_forms, _decode_form, checked_choice, choose, fastest, recipe_text,
                                     table, tune, why)
from infer_recipes.recipe import load_recipe, parse_recipe


def _row(config, change, decode, model="m", options=None):
    return {"config": config, "model": model, "options": options if options is not None else {"quantization": config},
            "perplexity": 10 * (1 + change / 100), "perplexity_change_pct": change, "top1_agreement": 0.99,
            "decode_vs_float32": decode, "prefill_vs_float32": decode, "decode_tokens_per_s": decode,
            "prefill_tokens_per_s": decode, "weight_bytes_per_decode_step": 1e6}


def test_the_fastest_within_the_budget_wins_and_near_ties_go_to_the_more_accurate():
    rows = [_row("float32", 0.0, 1.0, options={"dtype": "float32"}), _row("int4", 4.0, 3.0),
            _row("int8", 0.4, 1.8), _row("w8a8", 0.9, 1.83), _row("over", 1.2, 2.5)]
    assert choose(rows, 1.0, "decode")["config"] == "int8"  # w8a8 is 1.7 % faster: a tie, int8 is more accurate
    assert choose(rows, 5.0, "decode")["config"] == "int4"
    assert choose(rows, 0.0, "decode")["config"] == "float32"
    rows[2]["decode_vs_float32"] = 1.5  # now w8a8 is clearly faster
    assert choose(rows, 1.0, "decode")["config"] == "w8a8"
    # beyond 5 %, a row still ties when one of its run pairs beat the best row's worst
    fast = {**_row("fast", 0.8, 2.1), "decode_vs_float32_runs": [1.9, 2.1, 2.3]}
    rows[2]["decode_vs_float32_runs"] = [1.5, 1.7, 1.95]
    assert choose(rows[:3] + [fast], 1.0, "decode")["config"] == "int8"
    rows[2]["decode_vs_float32_runs"] = [1.5, 1.7, 1.85]
    assert choose(rows[:3] + [fast], 1.0, "decode")["config"] == "fast"
    untimed = [{**r, "decode_vs_float32": None} for r in rows]
    with pytest.raises(InferRecipesError, match="no configuration"):
        fastest(untimed, 1.0, "decode")
    with pytest.raises(InferRecipesError, match="no configuration"):
        choose(untimed, 1.0, "decode")


def test_int4_w8a8_answers_for_its_int4_decode_form():
    rows = [_row("float32", 0.0, 1.0, options={"dtype": "float32"}), _row("int4", 4.0, None), _row("w8a8", 0.5, 1)]
    phase = {**_row("int4-w8a8", 0.5, None), "config": "int4-w8a8"}
    _decode_form(phase, rows)  # a text's perplexity ran its w8a8 form; decoding runs int4
    assert (phase["perplexity_change_pct"], phase["scored_as"]) == (4.0, "int4")
    kv = _row("int4-w8a8 + int8 KV", 0.6, None, options={"quantization": "int4-w8a8", "kv_cache_dtype": "int8"})
    _decode_form(kv, rows + [_row("int4 + int8 KV", 0.2, None, options={"quantization": "int4",
                                                                         "kv_cache_dtype": "int8"})])
    assert kv["perplexity_change_pct"] == 0.6 and "scored_as" not in kv  # its own figure is the worse here


def test_the_chosen_line_says_whether_it_was_the_fastest_or_tied_with_it():
    rows = [_row("float32", 0.0, 1.0, options={"dtype": "float32"}), _row("int8", 0.4, 1.8), _row("w8a8", 0.9, 1.83)]
    result = {**_result(choose(rows, 1.0, "decode")["config"], rows), "fastest": fastest(rows, 1.0, "decode")["config"]}
    assert why(result) == ("chosen: int8 (the most accurate of the configurations within +1 % perplexity whose decode "
                           "speed the timed runs cannot tell from the fastest, w8a8)")
    rows[1]["decode_vs_float32"] = 1.5
    result = {**_result(choose(rows, 1.0, "decode")["config"], rows), "fastest": fastest(rows, 1.0, "decode")["config"]}
    assert why(result) == "chosen: w8a8 (the fastest decode within +1 % perplexity)"


def test_a_choice_over_the_budget_on_the_check_text_is_set_aside_and_the_choice_made_again():
    rows = [_row("float32", 0.0, 1.0, options={"dtype": "float32"}), _row("int4 calibrated", 0.9, 3.0),
            _row("gguf", 0.2, 2.6), _row("int8", 0.4, 2.0), _row("over", 1.5, 4.0)]
    on_check = {"float32": 0.0, "int4 calibrated": 1.7, "gguf": 0.3, "int8": 0.5}
    checked = []

    def check(row):
        checked.append(row["config"])
        row["check_perplexity_change_pct"] = on_check[row["config"]]

    assert checked_choice(rows, 1.0, "decode", check)["config"] == "gguf"
    assert checked == ["int4 calibrated", "gguf"]  # only the rows chosen are scored again; "over" never is
    result = {**_result("gguf", rows), "check_data": "/data/check.txt", "check_tokens": 4096,
              "fastest": fastest(rows, 1.0, "decode")["config"]}
    assert result["fastest"] == "gguf"  # the row set aside is out of the fastest as well
    assert why(result) == ("chosen: gguf (the fastest decode within +1 % perplexity on both texts); over the budget "
                           "on check.txt, so set aside: int4 calibrated (+1.70 %)")
    lines = table(result)
    assert lines[0].startswith("| config | perplexity | change | check change | top-1")
    assert "| int4 calibrated | 10.090 | +0.90 % | +1.70 % (over) | 0.990 |" in lines[3]
    assert "| int8 | 10.040 | +0.40 % | |" in lines[5]  # not chosen, so not checked
    # every row over the budget there: float32 holds (it is the reference) and is chosen
    on_check.update(gguf=1.2, int8=1.1)
    rows = [{k: v for k, v in r.items() if not k.startswith("check_")} for r in rows]
    checked.clear()
    assert checked_choice(rows, 1.0, "decode", check)["config"] == "float32"
    assert checked == ["int4 calibrated", "gguf", "int8", "float32"]
    # int4-w8a8 scores a text in its w8a8 form and decodes in int4: both are checked
    forms = _check_forms(_row("int4-w8a8", 0.5, 2.0))
    assert [f.options["quantization"] for f in forms] == ["int4-w8a8", "int4"]


def _result(chosen, rows):
    return {"model": "m", "source": "m", "device": "cpu", "budget_pct": 1.0, "objective": "decode",
            "data": "held.txt", "tokens": 4096, "batch": 1, "input_len": 256, "output_len": 64, "runs": 3,
            "calibrate": None, "rows": rows, "chosen": chosen, "seconds": 60.0}


def test_the_recipe_states_the_chosen_scheme_and_leaves_a_checkpoints_own_scheme_alone():
    rows = [_row("float32", 0.0, 1.0, options={"dtype": "float32"}),
            _row("int8 + int8 KV", 0.3, 1.9, options={"quantization": "int8", "kv_cache_dtype": "int8"}),
            _row("w8a8 calibrated", 0.5, 1.7, model="/ckpt/m-w8a8", options={})]
    recipe = parse_recipe(recipe_text(_result("int8 + int8 KV", rows), "m/tuned"))
    assert (recipe.model, recipe.engine.quantization, recipe.engine.kv_cache_dtype) == ("m", "int8", "int8")
    assert recipe.llm_kwargs()["quantization"] == "int8"
    text = recipe_text(_result("w8a8 calibrated", rows), "m/tuned")
    assert "| w8a8 calibrated (chosen) |" in text
    recipe = parse_recipe(text)
    assert recipe.model == "/ckpt/m-w8a8" and "quantization" not in recipe.llm_kwargs()
    rows.append(_row("int4, float lm_head", 0.3, 1.5,
                     options={"quantization": "int4", "quantization_skip": ["lm_head"]}))
    recipe = parse_recipe(recipe_text(_result("int4, float lm_head", rows), "m/tuned"))
    assert (recipe.engine.quantization, recipe.engine.quantization_skip) == ("int4", ("lm_head",))
    recipe = parse_recipe(recipe_text(_result("float32", rows), "m/tuned"))
    kwargs = recipe.llm_kwargs()  # stated, so a calibrated checkpoint named by --model would run in float too
    assert "quantization" in kwargs and kwargs["quantization"] is None and kwargs["dtype"] == "float32"


def test_bad_settings_are_refused_before_any_load(tmp_path):
    wiki = str(data_path("wikitext2/wiki.valid.tokens"))
    with pytest.raises(InferRecipesError, match="budget"):
        tune("synthetic:tiny-llama3", Settings(-1, wiki))
    with pytest.raises(InferRecipesError, match="not found"):
        tune("synthetic:tiny-llama3", Settings(1, str(tmp_path / "missing.txt")))
    with pytest.raises(InferRecipesError, match="same file"):
        tune("synthetic:tiny-llama3", Settings(1, wiki), calibrate=wiki)
    ptb = str(data_path("ptb/ptb.valid.txt"))
    with pytest.raises(InferRecipesError, match="--check-data and --data are the same file"):
        tune("synthetic:tiny-llama3", Settings(1, wiki, check_data=wiki))
    with pytest.raises(InferRecipesError, match="--calibrate and --check-data are the same file"):
        tune("synthetic:tiny-llama3", Settings(1, wiki, check_data=ptb), calibrate=ptb)
    with pytest.raises(InferRecipesError, match="not found"):
        tune("synthetic:tiny-llama3", Settings(1, wiki, check_data=str(tmp_path / "missing.txt")))
    assert main(["tune", "--model", "synthetic:tiny-llama3", "--accuracy-budget", "1", "--data", wiki,
                 "--out", str(tmp_path)]) == 2  # a directory, not a recipe file


def test_tune_writes_the_recipe_of_its_choice_and_its_perplexities_are_eval_perplexitys(tmp_path, capsys):
    wiki = str(data_path("wikitext2/wiki.valid.tokens"))
    out = tmp_path / "tuned.yaml"
    assert main(["tune", "--model", "synthetic:tiny-llama3", "--accuracy-budget", "0.05", "--data", wiki,
                 "--tokens", "300", "--window", "128", "--runs", "1", "--input-len", "16", "--output-len", "4",
                 "--threads", "1", "--check-data", str(data_path("ptb/ptb.valid.txt")), "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["float32"]["perplexity_change_pct"] == 0 and rows["float32"]["top1_agreement"] == 1
    for r in rows.values():  # timed exactly when within the budget
        assert (r.get("decode_vs_float32") is not None) == (r["perplexity_change_pct"] <= 0.05), r["config"]
    assert "int8 + int8 KV" in rows or rows["int8"]["perplexity_change_pct"] > 0.05
    chosen = rows[result["chosen"]]
    assert chosen["check_perplexity_change_pct"] <= 0.05  # held on the check text too
    assert all(r["check_perplexity_change_pct"] > 0.05 for r in rows.values()
               if "check_perplexity" in r and r is not chosen and r["config"] != "float32")  # the others were set aside
    recipe = load_recipe(str(out))
    assert recipe.model == chosen["model"]
    for key, value in {"dtype": "float32", "quantization": None, **chosen["options"]}.items():
        assert getattr(recipe.engine, key) == (tuple(value) if isinstance(value, list) else value), key
    # the int8 row's perplexity is what `eval perplexity` reports for int8 on the same tokens
    llm = LLM("synthetic:tiny-llama3", quantization="int8", max_model_len=1024, progress=False)
    measured = perplexity(llm, wiki, 300, window=128, stride=64, progress=False)["perplexity"]
    assert measured == pytest.approx(rows["int8"]["perplexity"], rel=1e-5)


def test_a_candidate_failing_while_timed_costs_its_row_not_the_run_and_the_choice_is_checked(monkeypatch):
    """A failure while a candidate is scored or timed (here: int8's timing, forced) is that row's "not here",
    with its reason; the others are measured and the choice made among them. With a check text, the row chosen
    (here int4 first, forced, as the speed ratios of a tiny model are a coin toss) is scored on it by the real
    model: its perplexity there is `eval perplexity`'s, as is float32's."""
    from infer_recipes.bench.engines import Unsupported
    from infer_recipes.eval import tune as tune_module

    real_race, real_choose = tune_module.race, tune_module.choose

    def race(reference, engine, *args, **kwargs):
        if engine.spec.label == "int8":
            raise Unsupported("int8 cannot be timed here")
        return real_race(reference, engine, *args, **kwargs)

    def choose(rows, budget_pct, objective):
        fits = tune_module._timed_within(rows, budget_pct, f"{objective}_vs_float32")
        return next((r for r in fits if r["config"] == "int4"), None) or real_choose(rows, budget_pct, objective)

    monkeypatch.setattr(tune_module, "race", race)
    monkeypatch.setattr(tune_module, "choose", choose)
    ptb = str(data_path("ptb/ptb.valid.txt"))
    settings = Settings(budget_pct=100.0, data=str(data_path("wikitext2/wiki.valid.tokens")), tokens=200, window=64,
                        runs=1, input_len=8, output_len=2, device="cpu", check_data=ptb)
    result = tune("synthetic:tiny-llama3", settings, progress=False, log=lambda line: None)
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["int8"] == {"config": "int8", "model": "synthetic:tiny-llama3", "options": {"quantization": "int8"},
                            "skipped": "failed while measured: Unsupported: int8 cannot be timed here"}
    assert rows["int8 + int8 KV"]["decode_vs_float32"] is not None  # queued before the failure, measured after it
    assert any(line.startswith("| int8 | not here: failed while measured") for line in table(result))
    assert result["chosen"] == "int4" and result["check_tokens"] == 200
    assert [r["config"] for r in result["rows"] if "check_perplexity" in r] == ["float32", "int4"]
    for config, options in (("float32", {"dtype": "float32"}), ("int4", {"quantization": "int4"})):
        llm = LLM("synthetic:tiny-llama3", max_model_len=1024, progress=False, **options)
        measured = perplexity(llm, ptb, 200, window=64, stride=32, progress=False)["perplexity"]
        assert measured == pytest.approx(rows[config]["check_perplexity"], rel=1e-5), config
    change = 100 * (rows["int4"]["check_perplexity"] / rows["float32"]["check_perplexity"] - 1)
    assert rows["int4"]["check_perplexity_change_pct"] == pytest.approx(change)
    assert "--check-data " + ptb in recipe_text(result, "m/tuned")
