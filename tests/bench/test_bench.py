"""The benchmark end to end on the tiny random model (runs in CI, no shared data needed), the transformers baseline
on the same weights, prompts cut to exact lengths, the roofline arithmetic, energy counters, the profiler."""
from __future__ import annotations

import json
import math

import pytest
import torch

from infer_recipes import kernels
from infer_recipes.bench import roofline
from infer_recipes.bench.energy import EnergyMeter
from infer_recipes.bench.prompts import load_prompt_set
from infer_recipes.cli import main
from infer_recipes.errors import InferRecipesError

from conftest import data_path

TINY = "synthetic:tiny-llama3"
TEXT = ("The Normans gave their name to Normandy, a region in France. They descended from Norse raiders.\n\n"
        "The Amazon rainforest covers much of the Amazon basin of South America.\n\n") * 20
ROW_KEYS = {"engine", "kind", "model", "recipe", "dtype", "device", "batch", "input_len", "output_len", "runs",
            "ttft_s", "e2e_s", "decode_s", "tpot_s", "prefill_tokens_per_s", "decode_tokens_per_s",
            "output_tokens_per_s", "total_tokens_per_s", "e2e_spread_pct", "preemptions", "joules",
            "tokens_per_joule", "weight_bytes_per_decode_step", "kv_bytes_per_token", "peak_memory_bytes",
            "decode_bound_tokens_per_s", "roofline_fraction"}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def _bench(args: list[str], capsys) -> dict:
    assert main(["bench", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _check_row(r: dict, runs: int) -> None:
    assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
    b, n, m = r["batch"], r["input_len"], r["output_len"]
    assert len(r["runs"]) == runs
    for key in ("ttft_s", "e2e_s", "decode_s", "tpot_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                "output_tokens_per_s", "total_tokens_per_s", "weight_bytes_per_decode_step", "kv_bytes_per_token"):
        assert r[key] > 0, key
    assert 0 < r["ttft_s"] < r["e2e_s"]
    assert r["e2e_s"] == pytest.approx(sorted(x["e2e_s"] for x in r["runs"])[runs // 2])  # the median (odd runs)
    # every rate is tokens / the reported seconds
    assert r["output_tokens_per_s"] * r["e2e_s"] == pytest.approx(b * m)
    assert r["total_tokens_per_s"] * r["e2e_s"] == pytest.approx(b * (n + m))
    assert r["prefill_tokens_per_s"] * r["ttft_s"] == pytest.approx(b * n)
    assert r["decode_tokens_per_s"] * r["decode_s"] == pytest.approx(b * (m - 1))
    assert r["tpot_s"] * (m - 1) == pytest.approx(r["decode_s"])
    assert r["preemptions"] == 0
    assert r["roofline_fraction"] == pytest.approx(r["decode_tokens_per_s"] / r["decode_bound_tokens_per_s"])
    assert 0 < r["roofline_fraction"] < 1


def test_bench_latency_end_to_end(tmp_path, prompts_file, capsys):
    out = tmp_path / "run"
    result = _bench(["latency", "--model", TINY, "--device", "cpu", "--batch-sizes", "1", "3", "--input-lens", "8",
                     "24", "--output-len", "6", "--runs", "3", "--prompts", prompts_file, "--out", str(out)], capsys)
    assert result["schema"] == "infer-recipes.bench/1" and result["command"] == "latency"
    meta = result["meta"]
    for key in ("python", "torch", "infer_recipes", "git_commit", "device_name", "cpu_cores", "torch_threads",
                "seeds", "date", "argv"):
        assert key in meta, key
    assert meta["torch"] == torch.__version__
    assert result["machine"]["bandwidth_read_gbs"] > 0 and result["machine"]["gflops"]["float32"] > 0
    assert result["energy"]["available"] or result["energy"]["why"]
    assert result["prompts"]["tokens_per_char"][TINY] > 0
    assert any("random weights" in n for n in result["notes"])
    rows = result["rows"]
    assert sorted((r["batch"], r["input_len"]) for r in rows) == [(1, 8), (1, 24), (3, 8), (3, 24)]
    for r in rows:
        _check_row(r, 3)
        assert r["peak_memory_bytes"] > 50e6  # torch + the model, resident in the child process
        if r["joules"] is not None:
            assert r["tokens_per_joule"] * r["joules"] == pytest.approx(r["batch"] * r["output_len"])
    # the files: the same object, one CSV line per row, the report, PNG plots
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == rows and set(saved["files"]) >= {"results.json", "results.csv", "report.md"}
    lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + len(rows) and lines[0].startswith("engine,kind,model")
    report = (out / "report.md").read_text()
    assert "| ours | synthetic:tiny-llama3 | 3 | 24 | 6 |" in report
    for name in ("throughput_vs_batch.png", "latency_vs_input.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert name in saved["files"]


def test_bench_sweep_baseline_off_end_to_end(tmp_path, prompts_file, capsys):
    result = _bench(["sweep", "--model", TINY, "--device", "cpu", "--baseline", "off", "--quantization", "int8",
                     "--batch-sizes", "1", "2", "--input-lens", "12", "--output-len", "5", "--runs", "1",
                     "--prompts", prompts_file], capsys)
    assert result["command"] == "sweep" and result["baseline"] == "off"
    engines = {e["label"]: e for e in result["engines"]}
    off = engines["off"]["options"]
    assert (off["kv_cache"], off["fusion"], off["compile"], off["quantization"], off["dtype"]) == \
        (False, False, False, None, "float32")
    assert engines["ours"]["options"]["quantization"] == "int8"
    for r in result["rows"]:
        _check_row(r, 1)
    rows = {(r["engine"], r["batch"]): r for r in result["rows"]}
    assert [(c["batch"], c["input_len"]) for c in result["comparison"]] == [(1, 12), (2, 12)]
    for c in result["comparison"]:
        base, ours = rows["off", c["batch"]], rows["ours", c["batch"]]
        assert (c["baseline_latency_s"], c["latency_s"]) == (base["e2e_s"], ours["e2e_s"])
        assert c["latency_change_pct"] == pytest.approx(100 * (ours["e2e_s"] / base["e2e_s"] - 1))
        assert c["throughput_change_pct"] == pytest.approx(
            100 * (ours["output_tokens_per_s"] / base["output_tokens_per_s"] - 1))
        assert c["memory_change_pct"] == pytest.approx(
            100 * (ours["peak_memory_bytes"] / base["peak_memory_bytes"] - 1))
        assert c["speedup"] == pytest.approx(base["e2e_s"] / ours["e2e_s"])


def test_sweep_llama_cpp_baseline_unavailable_is_skipped_not_fatal(prompts_file, capsys):
    # a synthetic model is no GGUF: llama.cpp cannot run it (or is not installed at all); ours still runs
    result = _bench(["sweep", "--model", TINY, "--device", "cpu", "--baseline", "llama.cpp", "--batch-sizes", "1",
                     "--input-lens", "8", "--output-len", "3", "--runs", "1", "--no-memory", "--no-roofline",
                     "--prompts", prompts_file], capsys)
    assert [s["engine"] for s in result["skipped"]] == ["llama.cpp"]
    assert "not installed" in result["skipped"][0]["why"] or "not a GGUF" in result["skipped"][0]["why"]
    [c] = result["comparison"]
    assert c["baseline_latency_s"] is None and c["latency_s"] > 0 and c["speedup"] is None


def test_transformers_baseline_runs_the_same_synthetic_weights(prompts_file):
    pytest.importorskip("transformers")
    from infer_recipes import LLM
    from infer_recipes.bench.engines import EngineSpec, TransformersEngine

    hf = TransformersEngine(EngineSpec("t", "transformers", TINY, {"device": "cpu"}), progress=False)
    ours = LLM(TINY, device="cpu", fusion=False, progress=False)
    ids = load_prompt_set(prompts_file).prompts(ours.tokenizer, 40, 1)[0]
    with torch.inference_mode():
        ref = hf.model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours.logits(ids), ref, atol=1e-4, rtol=1e-4)
    t = hf.run([ids, ids], 5)
    assert 0 < t.ttft_s < t.e2e_s
    assert hf.weight_bytes_read() == ours.weight_bytes()  # tied: the table is read as the lm_head


def test_bench_ablation_alone_and_cumulative(prompts_file, capsys):
    result = _bench(["ablation", "--model", TINY, "--device", "cpu", "--steps", "kv_cache", "fusion", "int8", "int4",
                     "kernels", "batching", "--batch", "3", "--input-len", "10", "--output-len", "4", "--runs", "1",
                     "--no-memory", "--no-roofline", "--prompts", prompts_file], capsys)
    ab = result["ablation"]
    assert [e["step"] for e in ab["alone"]] == ["kv_cache", "fusion", "int8", "int4", "kernels", "batching"]
    assert [e["config"] for e in ab["alone"]] == ["kv_cache", "fusion", "int8", "int4", "native", "off @b3"]
    assert [e["config"] for e in ab["cumulative"]] == [
        "kv_cache", "kv_cache+fusion", "kv_cache+fusion+int8", "kv_cache+fusion+int4", "kv_cache+fusion+int4+native",
        "kv_cache+fusion+int4+native @b3"]
    rows = {r["engine"]: r for r in result["rows"]}
    assert len(rows) == 1 + 6 + 5  # off, six alone, the chain's five new ones (kv_cache is shared)
    opts = {e["label"]: e["options"] for e in result["engines"]}
    assert opts["kv_cache+fusion+int4"]["quantization"] == "int4" and opts["int8"]["kv_cache"] is False
    # off is torch's kernels (the default is native): the kernels step is the only one that turns ours on
    assert opts["off"]["kernels"] == "torch" and opts["kv_cache+fusion+int4"]["kernels"] == "torch"
    assert opts["native"]["kernels"] == opts["kv_cache+fusion+int4+native @b3"]["kernels"] == "native"
    off = rows[ab["off"]]["output_tokens_per_s"]
    for e in ab["alone"] + ab["cumulative"]:
        r = rows[e["config"]]
        assert e["tokens_per_s"] == r["output_tokens_per_s"] and e["batch"] == r["batch"]
        assert e["vs_off"] == pytest.approx(r["output_tokens_per_s"] / off)
    chain = ab["cumulative"]
    # int4 is compared with the last configuration without a scheme, not with int8 beside it
    assert chain[3]["vs_previous"] == pytest.approx(chain[3]["tokens_per_s"] / chain[1]["tokens_per_s"])
    assert chain[4]["vs_previous"] == pytest.approx(chain[4]["tokens_per_s"] / chain[3]["tokens_per_s"])
    assert chain[5]["vs_previous"] == pytest.approx(chain[5]["tokens_per_s"] / chain[4]["tokens_per_s"])


@pytest.mark.parametrize("args,message", [
    (["latency", "--output-len", "1"], "--output-len must be at least 2"),
    (["latency", "--batch-sizes", "0"], "--batch-sizes must list positive integers"),
    (["latency", "--prompts", "/nonexistent/prompts.txt"], "choose en, zh or an existing text file"),
    (["ablation", "--steps", "kv_cache", "turbo"], "unknown ablation step(s) turbo"),
    (["sweep", "--recipe", "smollm2-135m-instruct/nope"], "smollm2-135m-instruct/nope"),
    (["latency", "--threads", "-1"], "--threads must be a positive integer"),
])
def test_bench_bad_arguments_are_one_line(args, message, capsys):
    extra = [] if "--prompts" in args else ["--prompts", __file__]
    assert main(["bench", *args, *extra, "--no-memory", "--no-roofline"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]


def test_prompts_exact_length_distinct_and_from_the_file(prompts_file):
    from infer_recipes import LLM

    tok = LLM(TINY, device="cpu", progress=False).tokenizer
    ps = load_prompt_set(prompts_file)
    assert ps.kind == "file" and len(ps.texts) == 40
    prompts = ps.prompts(tok, 50, 3)
    assert [len(p) for p in prompts] == [50, 50, 50] and len({tuple(p) for p in prompts}) == 2  # texts alternate
    assert prompts[0][0] == tok.bos_token_id
    assert tok.decode(prompts[0][1:20]) == TEXT[:19]
    with pytest.raises(InferRecipesError, match="only .* tokens"):
        ps.prompts(tok, 100_000, 1)


def test_english_and_chinese_prompts_tokens_per_char(smollm):
    data_path("squad", "dev-v2.0.part-a.json")
    data_path("cmrc2018", "cmrc2018_trial.json")
    en, zh = load_prompt_set("en"), load_prompt_set("zh")
    assert en.texts[0].startswith("The Normans")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh.texts[0])
    for ps in (en, zh):
        assert all(len(p) == 300 for p in ps.prompts(smollm.tokenizer, 300, 4))
    # SmolLM2's English-centred vocabulary: a Chinese character costs far more tokens than an English one
    en_tpc, zh_tpc = en.tokens_per_char(smollm.tokenizer), zh.tokens_per_char(smollm.tokenizer)
    assert 0.15 < en_tpc < 0.4 and zh_tpc > 3 * en_tpc


def test_roofline_arithmetic_and_verdicts():
    machine = {"bandwidth_read_gbs": 20.0, "gflops": {"float32": 100.0, "bfloat16": 400.0, "int8": None}}
    # weights 100 MB read once, plus 4 sequences x 1 KB per token x (100 + 50) mean context
    assert roofline.decode_bytes(100e6, 1000, 4, 100, 100) == 100e6 + 4 * 1000 * 150
    bound = roofline.decode_bound_tps(machine, 100e6, 0, 8, 10, 10)
    assert bound == pytest.approx(8 * 20e9 / 100e6)
    v = roofline.verdict(machine, seconds=0.01, bytes_moved=100e6, flops=0.2e9, dtype="float32")
    assert v["bound"] == "memory" and v["roof_seconds"] == pytest.approx(0.005)
    assert v["fraction_of_roof"] == pytest.approx(0.5)
    v = roofline.verdict(machine, seconds=1.0, bytes_moved=100e6, flops=50e9, dtype="bfloat16")
    assert v["bound"] == "compute" and v["roof_seconds"] == pytest.approx(0.125)
    assert roofline.verdict(machine, 1.0, 1e6, 1e9, "int8")["dtype"] == "int8"  # n/a int8 falls back to fp32 roof
    assert roofline.compute_dtype("float32", "int4-w8a8", "prefill") == "int8"
    assert roofline.compute_dtype("float32", "int4-w8a8", "decode") == "bfloat16"
    assert roofline.compute_dtype("float32", None, "decode") == "float32"
    from infer_recipes.models.registry import PRESETS

    c = PRESETS["llama-2-7b"]  # ~6.7e9 weights in the linears and lm_head -> ~13.5 GFLOP per token
    assert 13e9 < roofline.matmul_flops_per_token(c, 0) < 14e9


def test_measure_machine_quick():
    m = roofline.measure_machine(torch.device("cpu"), quick=True)
    assert m["bandwidth_read_gbs"] > 0.5 and m["bandwidth_copy_gbs"] > 0.5
    assert m["gflops"]["float32"] > 1 and m["gflops"]["bfloat16"] > 0
    assert "AMD" in roofline.format_machine(m) or "GB/s" in roofline.format_machine(m)


def test_best_time_waits_for_a_queued_device():
    """A GPU call returns when queued: timing must wait for the work. A fake queue whose calls each take 5 ms
    (paid only at sync, like a stream) is timed at 5 ms a call, and sizing a round queues a few calls, not
    thousands (which took minutes on an H200 before the calibration synced)."""
    import time

    queued = []

    def call():
        queued.append(0.005)

    def sync():
        time.sleep(sum(queued))
        queued.clear()

    start = time.perf_counter()
    per_call = roofline._best_time(call, sync, repeats=2, min_seconds=0.02)
    assert per_call == pytest.approx(0.005, rel=0.5)
    assert time.perf_counter() - start < 1.0


def test_energy_meter_reads_rapl_and_survives_wraparound(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)  # a subzone (dram) is not counted twice
    (zone / "energy_uj").write_text("1000000\n")
    (zone / "max_energy_range_uj").write_text("5000000\n")
    (zone / "intel-rapl:0:0" / "energy_uj").write_text("7\n")
    meter = EnergyMeter(torch.device("cpu"), powercap=tmp_path)
    assert meter.available and "intel-rapl:0" in meter.source
    start = meter.read()
    (zone / "energy_uj").write_text("3500000\n")
    assert meter.read() - start == pytest.approx(2.5)
    (zone / "energy_uj").write_text("500000\n")  # wrapped past 5 J
    assert meter.read() - start == pytest.approx(4.5)
    absent = EnergyMeter(torch.device("cpu"), powercap=tmp_path / "none")
    assert not absent.available and absent.read() is None and "absent" in absent.why


def test_weight_bytes_read_count_what_a_step_reads():
    from infer_recipes.bench.engines import EngineSpec, OurEngine

    plain = OurEngine(EngineSpec("a", "ours", TINY, {"device": "cpu"}), 1, 64, False)
    assert plain.weight_bytes_read() == plain.llm.weight_bytes()  # tied: every tensor is read
    int4 = OurEngine(EngineSpec("b", "ours", TINY, {"device": "cpu", "quantization": "int4"}), 1, 64, False)
    table = int4.llm.model.model.embed_tokens
    table_bytes = sum(t.numel() * t.element_size() for t in [*table.parameters(), *table.buffers()])
    # the int4 lm_head is read; the int8 embedding table beside it is not (one row per token)
    assert int4.weight_bytes_read() == int4.llm.weight_bytes() - table_bytes
    # int4-w8a8 holds both forms: a decode of few rows (<= 4 on torch's kernels, 16 on ours) reads the int4 one,
    # more rows the w8a8 one; on our AVX2 kernels (no VNNI for torch's int8 GEMM either) the int4 one takes all
    both = OurEngine(EngineSpec("c", "ours", TINY, {"device": "cpu", "quantization": "int4-w8a8"}), 1, 64, False)
    if kernels.isa() == "avx2":
        assert both.weight_bytes_read(32) == both.weight_bytes_read(1) < both.llm.weight_bytes() - table_bytes
    else:
        assert both.weight_bytes_read(1) < both.weight_bytes_read(32) < both.llm.weight_bytes() - table_bytes
    assert both.weight_bytes_read(1) == int4.weight_bytes_read(1)
    c = plain.config
    assert plain.kv_bytes_per_token() == c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_profile_top_ops_trace_and_verdict(tmp_path, prompts_file, phase, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--model", TINY, "--device", "cpu", "--phase", phase, "--batch-size", "2",
                 "--input-len", "24", "--steps", "3", "--prompts", prompts_file, "--top", "6", "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["phase"] == phase and len(result["times"]) == 3 and result["seconds_per_unit"] > 0
    ops = result["top_ops"]
    assert len(ops) == 6 and all(o["self_ms"] > 0 and o["calls"] > 0 for o in ops)
    assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
    assert 0 < sum(o["share"] for o in ops) <= 1 + 1e-9
    assert any(o["op"] in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear") for o in ops)
    v = result["verdict"]
    assert v["bound"] in ("memory", "compute") and v["bytes"] > 0 and v["flops"] > 0
    assert math.isclose(v["fraction_of_roof"], v["roof_seconds"] / v["measured_seconds"])
    trace = json.loads((out / "trace.json").read_text())
    assert trace["traceEvents"]
    assert json.loads((out / "profile.json").read_text())["top_ops"] == ops


def test_a_decode_profile_times_steps_of_the_whole_batch_when_prefill_is_chunked(prompts_file):
    """A small prefill budget starts the batch's sequences steps apart, the first ones tokens ahead: the profile
    gives every sequence room for that lead, so none finishes while steps are timed (it refuses to report steps
    of a smaller batch), and ends the requests after."""
    from infer_recipes import profile

    result = profile.run(TINY, {"device": "cpu", "max_num_batched_tokens": 8}, "decode", 4, 24, 3, prompts_file,
                         top=3, roofline_on=False, progress=False)
    assert result["batch"] == 4 and len(result["times"]) == len(result["profiled_times"]) == 3


@pytest.mark.skipif(not kernels.available(), reason="the native kernels do not run here")
def test_profile_names_our_kernels_and_counts_fewer_calls(prompts_file, capsys):
    """The kernels are recorded under their own names (a profile that hid them would blame the aten ops around
    them), and the native decode step dispatches fewer operators than torch's."""
    results = {}
    for switch in ("torch", "native"):
        assert main(["profile", "--model", TINY, "--device", "cpu", "--phase", "decode", "--batch-size", "2",
                     "--input-len", "24", "--steps", "3", "--prompts", prompts_file, "--top", "200",
                     "--quantization", "int8", "--kernels", switch, "--no-roofline", "--json"]) == 0
        results[switch] = json.loads(capsys.readouterr().out)
    ours = {o["op"] for o in results["native"]["top_ops"] if o["op"].startswith("infer_recipes::")}
    # the tiny model's head_dim (16) is below what rotary and attention take: its linears, norms and MLP run ours
    assert {"infer_recipes::int8_linear", "infer_recipes::rms_norm", "infer_recipes::silu_mul"} <= ours
    assert not any(o["op"].startswith("infer_recipes::") for o in results["torch"]["top_ops"])
    assert results["native"]["kernels"] == "native" and results["torch"]["kernels"] == "torch"
    assert 0 < results["native"]["operator_calls_per_unit"] < results["torch"]["operator_calls_per_unit"]
