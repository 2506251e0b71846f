"""GPTQ rounding for int4 (`infer-recipes quantize --gptq`): it is round-to-nearest when the inputs are
uncorrelated, it cuts the output error where they are not, and a checkpoint loads the very codes it chose."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import data_path
from safetensors.torch import load_file

from infer_recipes import LLM
from infer_recipes.checkpoint import made_from
from infer_recipes.cli import main
from infer_recipes.quantization.gptq import cross_entropy, gptq, output_error, pack, round_head, unpack
from infer_recipes.quantization.int4 import Int4Linear, _expand


@pytest.mark.parametrize("act_order", [True, False])
def test_with_uncorrelated_inputs_gptq_is_round_to_nearest(act_order):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.05
    for got, want in zip(gptq(w, torch.eye(256) * 3.0, 32, act_order=act_order), Int4Linear.quantize(w, 32)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_cuts_the_output_error_of_correlated_inputs(group_size, act_order):
    g = torch.Generator().manual_seed(1)
    n, k = 80, 384
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(2048, 24, generator=g) @ torch.randn(24, k, generator=g) + 0.2 * torch.randn(2048, k, generator=g)
    x[:, 7] = 0  # a channel the text never moves
    h = x.t() @ x / x.shape[0]
    q, scales, zeros = gptq(w, h, group_size, act_order=act_order)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.shape == (n, k // group_size)
    assert torch.equal(scales.to(torch.bfloat16).float(), scales)  # on the grid the kernel holds
    ours = output_error(w, _expand(q, scales, zeros, group_size), h)
    nearest = output_error(w, Int4Linear.fake(w, group_size), h)
    assert ours < 0.5 * nearest, (ours, nearest)
    # the error it reports is the output error on those inputs
    y = x @ w.t()
    yq = x @ _expand(q, scales, zeros, group_size).t()
    assert ours == pytest.approx((y - yq).pow(2).sum().item() / x.shape[0], rel=1e-3)
    assert torch.equal(unpack(pack(q)), q)


def test_a_gptq_checkpoint_loads_the_codes_it_chose(smollm, tmp_path, capsys):
    ptb = str(data_path("ptb", "ptb.valid.txt"))
    out = tmp_path / "gptq"
    assert main(["quantize", "--model", "smollm2-135m-instruct", "--scheme", "int4", "--gptq", "--calibrate", ptb,
                 "--samples", "2", "--seq-len", "64", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "quantization.json").read_text())
    assert saved["int4_codes"] == "int4.safetensors" and saved["gptq"] == report["gptq"]
    assert saved["gptq"]["linears"] == 7 * 30 + 1  # every decoder linear and the lm_head
    errors = saved["gptq"]["output_error"]
    assert errors["gptq"] < 0.5 * errors["round_to_nearest"]
    assert made_from(str(out), "smollm2-135m-instruct", "int4", ptb, 2, 64, use_gptq=True)
    assert not made_from(str(out), "smollm2-135m-instruct", "int4", ptb, 2, 64)

    codes = load_file(str(out / "int4.safetensors"))

    def chosen(name: str, held=torch.bfloat16) -> torch.Tensor:
        """The weight the saved codes give, with scale and zero as a layout holds them."""
        return _expand(unpack(codes[f"{name}.qweight"]), codes[f"{name}.scales"].to(held).float(),
                       codes[f"{name}.zeros"].to(held).float(), 32)

    # loaded, every int4 module holds exactly the codes GPTQ chose (fused modules: their parts, stacked)
    for kernels in ("torch", "native"):
        q = LLM(str(out), kernels=kernels, progress=False)

        def same(module, names):
            if module.native:  # our layout holds scale and zero in float16 and unpacks exactly
                return torch.equal(module.dequantize(), torch.cat([chosen(n, torch.float16) for n in names]))
            # torch's is read back through its kernel, whose bfloat16 output rounds each weight once
            return torch.allclose(module.dequantize(), torch.cat([chosen(n) for n in names]), rtol=2 ** -8, atol=0)

        assert q.model.load_report.startswith("GPTQ int4 codes -> int4 x 121")
        layer = q.model.model.layers[3]
        parts = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj": ("mlp.down_proj",)}
        for fused, names in parts.items():
            assert same(layer.get_submodule(fused), [f"model.layers.3.{n}" for n in names]), (kernels, fused)
        assert same(q.model.lm_head, ["lm_head"]), kernels
    # the saved float weights of the decoder are what the codes compute (bfloat16-rounded); the tied lm_head's
    # float weight is the embedding table, left as it was
    flat = LLM(str(out), dtype="float32", fusion=False, kernels="torch", quantization="none", progress=False)
    w = flat.model.model.layers[3].self_attn.o_proj.weight
    assert torch.equal(w, chosen("model.layers.3.self_attn.o_proj").to(torch.bfloat16).float())
    assert not torch.equal(flat.model.lm_head.weight, chosen("lm_head").to(torch.bfloat16).float())
    # another group size cannot use them: the saved weights are rounded to nearest, and the load says so
    g64 = LLM(str(out), group_size=64, progress=False)
    assert "not used (made for group size 32, 64 asked)" in g64.model.load_report and g64.model.lm_head.group_size == 64
    # and it still answers like the model it came from
    ids = smollm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    assert smollm.logits(ids)[-1].argmax().item() in q.logits(ids)[-1].topk(3).indices.tolist()


def test_the_head_keeps_gptq_only_where_it_predicts_held_out_windows_better():
    g = torch.Generator().manual_seed(2)
    vocab, k, rows = 64, 96, 40
    w = torch.randn(vocab, k, generator=g) * 0.1
    basis = torch.randn(6, k, generator=g)
    windows = [torch.randn(rows, 6, generator=g) @ basis + 0.05 * torch.randn(rows, k, generator=g)
               for _ in range(8)]
    nearest = Int4Linear.quantize(w, 32)
    fit = torch.cat(windows[:6])  # three quarters: the last two windows are only judged on
    fitted = gptq(w, fit.t() @ fit / len(fit), 32)
    held = torch.cat(windows[6:])
    # next tokens the float head predicts: GPTQ's head, nearer the float one, predicts them better; those the
    # round-to-nearest head itself predicts: it wins
    for labels, want in (((held @ w.t()).argmax(-1), fitted), ((held @ _expand(*nearest, 32).t()).argmax(-1), nearest)):
        targets = torch.cat([torch.full((6 * rows,), -100), labels])  # no next token known in the fit windows
        gptq_better = (cross_entropy(held, _expand(*fitted, 32), labels)
                       < cross_entropy(held, _expand(*nearest, 32), labels))
        assert gptq_better == (want is fitted)
        got = round_head(w, windows, targets, 32, nearest)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    # one window: nothing to hold out, so round-to-nearest
    assert round_head(w, windows[:1], targets[:rows], 32, nearest) is nearest
