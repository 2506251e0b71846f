"""Calibrated scaling (SmoothQuant for w8a8, activation-aware for int4 / int8) and the checkpoint `infer-recipes
quantize` writes: the scaling is exact on the float model, the search never raises a group's error and cuts it
where activations have outlier channels, and the saved directory reloads to the very weights it was made from."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import data_path
from safetensors.torch import load_file
from torch import nn

from infer_recipes import LLM
from infer_recipes.checkpoint import made_from
from infer_recipes.cli import main
from infer_recipes.config import EngineConfig
from infer_recipes.errors import InferRecipesError
from infer_recipes.quantization import calibrate as cal
from infer_recipes.recipe import load_recipe
from infer_recipes.runner import checkpoint_switches


def test_scaling_leaves_the_float_model_unchanged():
    llm = LLM("synthetic:tiny-llama3", dtype="float32", fusion=False, kernels="torch", progress=False)
    ids = list(range(3, 40))
    before = llm.logits(ids)
    found = cal.groups(llm.model)
    assert [g.name for g in found[:3]] == ["model.layers.0.attn", "model.layers.0.mlp", "model.layers.0.down"]
    g = torch.Generator().manual_seed(0)
    width = {"attn": 64, "mlp": 64, "down": 128}
    factors = {grp.name: torch.exp(torch.randn(width[grp.name.rsplit(".", 1)[1]], generator=g)) for grp in found}
    weight = llm.model.model.layers[0].self_attn.q_proj.weight.clone()
    cal.apply(llm.model, found, factors)
    assert not torch.equal(weight, llm.model.model.layers[0].self_attn.q_proj.weight)  # it did scale
    after = llm.logits(ids)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()


def test_fused_models_are_refused():
    llm = LLM("synthetic:tiny-llama3", dtype="float32", progress=False)  # fusion on
    with pytest.raises(ValueError, match="unfused"):
        cal.groups(llm.model)


class _Pair(nn.Module):
    """An RMSNorm-like scale followed by one linear: the smallest scalable group."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(w.shape[1]), requires_grad=False)
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.lin.weight = nn.Parameter(w.clone(), requires_grad=False)


@pytest.mark.parametrize("scheme", cal.CALIBRATED)
def test_the_search_cuts_the_error_of_outlier_channels_and_never_raises_it(scheme):
    g = torch.Generator().manual_seed(1)
    k, n = 256, 96
    w = torch.randn(n, k, generator=g) * 0.05
    channel = torch.ones(k)
    channel[torch.randperm(k, generator=g)[:6]] = 40.0  # a few activation channels far larger than the rest
    x = torch.randn(512, k, generator=g) * channel
    model = _Pair(w)
    group = cal.Group("g", ("lin",), "norm", abs_sum=x.abs().sum(0, dtype=torch.float64), abs_max=x.abs().amax(0),
                      count=x.shape[0], rows=x, filled=x.shape[0])
    factors, (choice,) = cal.search(model, [group], scheme, progress=False)
    assert choice.error <= choice.error_unscaled
    assert choice.error < 0.8 * choice.error_unscaled, choice  # the outliers are what scaling is for
    assert choice.alpha > 0
    # the reported error is the error of the model as it will run: scaled, then quantized by the scheme
    ref = x @ w.t()
    cal.apply(model, [group], factors)
    x_in = x * model.norm.weight  # the norm multiplies by its weight, now 1 / s
    y = cal.quantized_output(scheme, x_in, model.lin.weight, torch.ones(k), 32)
    assert (y - ref).pow(2).sum().item() == pytest.approx(choice.error, rel=1e-3)


def test_a_calibrated_checkpoint_reloads_to_the_weights_it_was_made_from(smollm, tmp_path, capsys):
    ptb = str(data_path("ptb", "ptb.valid.txt"))
    out = tmp_path / "awq"
    assert main(["quantize", "--model", "smollm2-135m-instruct", "--scheme", "int4", "--calibrate", ptb,
                 "--samples", "2", "--seq-len", "64", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "quantization.json").read_text())
    assert saved["scheme"] == "int4" and saved["group_size"] == 32
    assert saved["calibration"]["tokens"] == 128 and len(saved["calibration"]["sha256"]) == 64
    assert len(saved["alpha"]) == 3 * 30 and report["output_error"] == saved["output_error"]
    assert saved["output_error"]["scaled"] <= saved["output_error"]["unscaled"]
    # `tune` reuses it only for the very same arguments
    assert made_from(str(out), "smollm2-135m-instruct", "int4", ptb, 2, 64)
    other = tmp_path / "other.txt"
    other.write_text(open(ptb).read() + " ")
    for args in (("w8a8", ptb, 2, 64), ("int4", ptb, 3, 64), ("int4", ptb, 2, 128), ("int4", str(other), 2, 64)):
        assert not made_from(str(out), "smollm2-135m-instruct", *args), args

    # the same scaling applied by hand to the float model, rounded as saved: the reload must equal it bit for bit
    factors = load_file(str(out / "smoothing.safetensors"))
    ref = LLM("smollm2-135m-instruct", dtype="float32", fusion=False, kernels="torch", progress=False)
    cal.apply(ref.model, cal.groups(ref.model), factors)
    with torch.no_grad():
        for p in ref.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    back = LLM(str(out), dtype="float32", fusion=False, kernels="torch", quantization="none", progress=False)
    assert back.engine_config.quantization is None  # `none` is a choice: the scaled float model
    theirs = dict(back.model.named_parameters())
    for name, p in ref.model.named_parameters():
        assert torch.equal(p, theirs[name]), name
    ids = smollm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    assert torch.equal(back.logits(ids), ref.logits(ids))
    # tokenizer and chat template travel with it
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert back.tokenizer.encode("héllo wörld 123") == smollm.tokenizer.encode("héllo wörld 123")
    assert back.tokenizer.apply_chat_template(chat) == smollm.tokenizer.apply_chat_template(chat)

    # loaded plainly it runs as what it was calibrated for, and answers like the model it came from
    q = LLM(str(out), progress=False)
    assert q.engine_config.quantization == "int4" and q.engine_config.group_size == 32
    assert q.model.model.layers[0].self_attn.qkv_proj.__class__.__name__ == "Int4Linear"
    top = q.logits(ids)[-1].topk(5).indices.tolist()
    assert smollm.logits(ids)[-1].argmax().item() in top
    # a recipe naming it brings the same scheme, unless it states its own
    for stated, scheme in (("", "int4"), ("optimization:\n  quantization: none\n", None)):
        path = tmp_path / "r.yaml"
        path.write_text(f"model:\n  name: {out}\n{stated}")
        recipe = load_recipe(str(path))
        assert EngineConfig(**checkpoint_switches(recipe.model, recipe.llm_kwargs())).quantization == scheme


def test_quantize_refuses_what_it_cannot_do(smollm, tmp_path):
    ptb = str(data_path("ptb", "ptb.valid.txt"))
    from infer_recipes.checkpoint import quantize_checkpoint

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InferRecipesError, match="not empty"):
        quantize_checkpoint("smollm2-135m-instruct", "int4", ptb, str(busy))
    with pytest.raises(InferRecipesError, match="calibration exists for"):
        quantize_checkpoint("smollm2-135m-instruct", "int4-w8a8", ptb, str(tmp_path / "x"))
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    with pytest.raises(InferRecipesError, match="less than one window"):
        quantize_checkpoint("smollm2-135m-instruct", "int4", str(short), str(tmp_path / "y"), seq_len=64)
    assert (busy / "notes.txt").read_text() == "mine" and not (tmp_path / "y").exists()
