"""The deployment planner's arithmetic on known cases, and its command."""
from __future__ import annotations

import json

import pytest

from infer_recipes.cli import main
from infer_recipes.models.registry import PRESETS
from infer_recipes.plan import Hardware, kv_bytes_per_token, layout, plan, weight_bytes

H100 = Hardware(devices=8, memory_gb=80, bandwidth_gbs=2000, link_gbs=300, link_latency_us=10)


def test_llama2_7b_memory_by_hand():
    c = PRESETS["llama-2-7b"]
    # bf16: two bytes per parameter, every parameter on one device
    assert weight_bytes(c, "bfloat16") == 2 * c.num_parameters == 2 * 6_738_415_616
    # KV per token: 32 layers x (K + V) x 32 heads x 128 x 2 bytes = 512 KiB
    assert kv_bytes_per_token(c, "bfloat16") == 32 * 2 * 32 * 128 * 2 == 524_288
    lay = layout(c, Hardware(1, 80, 2000, 300), 1, 1, "bfloat16", "bfloat16", batch=1, context=4096)
    free = 80e9 * 0.9 - 1e9 - 2 * 6_738_415_616
    assert lay.fits and lay.kv_tokens == int(free // 524_288) == 109_716
    assert lay.max_batch == 109_716 // 4096 == 26 and lay.max_context == 4096  # the model's window caps it
    # decode at batch 1: weights + 4096 tokens of cache over 2000 GB/s, no communication
    assert lay.latency_ms == pytest.approx((2 * 6_738_415_616 + 4096 * 524_288) / 2000e9 * 1e3)
    assert lay.comm_ms == 0 and lay.tokens_per_s == pytest.approx(1e3 / lay.latency_ms)


def test_tensor_parallel_splits_linears_and_vocab_but_not_norms():
    c = PRESETS["llama-2-7b"]
    norms = (2 * c.num_layers + 1) * c.hidden_size * 2
    assert weight_bytes(c, "bfloat16", tp=2) == pytest.approx((2 * c.num_parameters - norms) / 2 + norms)
    assert kv_bytes_per_token(c, "bfloat16", tp=2) == 524_288 / 2
    # llama-3.2-3b has 8 KV heads: at TP=16 each rank keeps one replicated head, not half of one
    c3 = PRESETS["llama-3.2-3b"]
    assert kv_bytes_per_token(c3, "bfloat16", tp=16) == 28 * 2 * 1 * 128 * 2


def test_int4_and_int8_weights_with_scales():
    c = PRESETS["llama-3.2-3b"]
    assert weight_bytes(c, "int4") / weight_bytes(c, "bfloat16") == pytest.approx((0.5 + 4 / 32) / 2, rel=1e-3)
    assert weight_bytes(c, "int8") / weight_bytes(c, "bfloat16") == pytest.approx(0.5, rel=1e-2)


def test_llama2_70b_needs_more_than_one_80gb_device():
    c = PRESETS["llama-2-70b"]
    layouts = {lay.name: lay for lay in plan(c, H100, "bfloat16", "bfloat16", batch=8, context=4096)}
    assert set(layouts) == {"single device", "PP=8", "TP=2 x PP=4", "TP=4 x PP=2", "TP=8"}
    single = layouts["single device"]
    assert not single.fits and "exceed" in single.why and single.weight_gb == pytest.approx(137.95, abs=0.01)
    for name in ("PP=8", "TP=8"):
        assert layouts[name].fits and layouts[name].weight_gb < 18
    # TP splits the weights each step reads; PP's stages run one after another for the same token
    assert layouts["TP=8"].latency_ms < layouts["PP=8"].latency_ms
    assert layouts["TP=8"].comm_ms > 0 and layouts["PP=8"].comm_ms < layouts["TP=8"].comm_ms


def test_heads_that_do_not_split_are_refused():
    c = PRESETS["smollm2-135m"]  # 9 heads, 3 KV heads
    lay = layout(c, Hardware(2, 32, 1000, 100), 2, 1, "bfloat16", "bfloat16", 1, 512)
    assert not lay.fits and "9 heads do not split over 2 ranks" in lay.why


def test_plan_command_and_calibration(tmp_path, capsys):
    assert main(["plan", "--model", "llama-2-7b", "--devices", "2", "--device-memory", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [lay["name"] for lay in out["layouts"]]
    assert names == ["single device", "PP=2", "TP=2"]
    assert out["hardware"]["bandwidth_gbs"] == 2000.0
    results = tmp_path / "results.json"
    rows = [{"kind": "ours", "roofline_fraction": f} for f in (0.1, 0.25, 0.5)] + \
        [{"kind": "transformers", "roofline_fraction": 0.9}]
    results.write_text(json.dumps({"machine": {"bandwidth_read_gbs": 40.0, "device_name": "test CPU"},
                                   "rows": rows}))
    assert main(["plan", "--model", "llama-3.2-1b", "--device-memory", "24", "--calibrate", str(results)]) == 0
    text = capsys.readouterr().out
    assert "memory bandwidth 40 GB/s" in text and "calibrated from" in text and "| single device | yes |" in text
    assert "kernels at 25% of the bandwidth roof" in text  # the median of ours, not the baseline's
    args = ["plan", "--model", "llama-3.2-1b", "--device-memory", "24", "--batch", "1", "--context", "100", "--json"]
    assert main([*args, "--calibrate", str(results)]) == 0
    slow = json.loads(capsys.readouterr().out)["layouts"][0]["latency_ms"]
    assert main([*args, "--bandwidth", "40"]) == 0
    assert json.loads(capsys.readouterr().out)["layouts"][0]["latency_ms"] == pytest.approx(slow * 0.25)
    results.write_text("{}")
    assert main(["plan", "--model", "llama-3.2-1b", "--calibrate", str(results)]) == 2
    assert "not a bench results.json" in capsys.readouterr().err
