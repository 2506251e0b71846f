"""The roofline: what this machine can move and compute, and what a model's decode and prefill need of it.

Decode reads every weight once per step (whatever the batch) plus each sequence's KV cache, so its tokens/s is
bounded by bandwidth / bytes per step x batch; prefill does 2 FLOPs per weight per token (plus attention), so
long prompts meet the compute roof instead. A phase is memory-bound when moving its bytes takes longer at the
measured bandwidth than doing its FLOPs at the measured matmul rate.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from ..device import device_name, synchronize


def _best_time(fn: Callable[[], object], sync: Callable[[], None], repeats: int, min_seconds: float = 0.05) -> float:
    """The best (least) seconds per call over `repeats` rounds, each round long enough to time: a roof is what the
    machine can reach, and on a shared machine the slower rounds measure the neighbours.

    sync() waits for the device. A GPU call returns once it is queued, so the calibration that sizes a round waits
    for each call: counting queued calls sized rounds at thousands of 20 ms matmuls (minutes on an H200)."""
    fn()
    sync()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds or calls < 1:
        fn()
        sync()
        calls += 1
    per_round = max(1, calls)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(per_round):
            fn()
        sync()
        times.append((time.perf_counter() - t) / per_round)
    return min(times)


def _bandwidth(device: torch.device, nbytes: int, repeats: int, sync: Callable[[], None]) -> tuple[float, float]:
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return nbytes / _best_time(x.sum, sync, repeats), 2 * nbytes / _best_time(lambda: y.copy_(x), sync, repeats)


def _matmul_size(make, largest: int, sync, budget_s: float = 0.05) -> int:
    """The matrix size to time a matmul kind at: `largest`, unless one call would take more than `budget_s`.
    Where a kind has no fast kernel (bfloat16 or int8 on a CPU without AVX-512: 2048^3 in bfloat16 takes two
    minutes on an AVX2 EPYC) the size doubles from 256 only while the next call stays within budget."""
    k = 256
    while k < largest:
        fn = make(k)
        fn()  # warm-up
        sync()
        t = time.perf_counter()
        fn()
        sync()
        if (time.perf_counter() - t) * 8 > budget_s:  # the next size costs ~8x
            break
        k *= 2
    return k


def measure_machine(device: torch.device, quick: bool = False) -> dict:
    """Memory bandwidth (read: a sum over a buffer far larger than the caches; copy: read + write) and matmul
    FLOP/s for float32, bfloat16 (float16 where bf16 is absent) and int8 (`torch._int_mm`, where supported)."""
    accel = device.type != "cpu"
    mb = 256 * (8 if accel else 1)  # far beyond any cache, even in quick mode
    repeats = 3 if quick else 5
    sync = functools.partial(synchronize, device)
    read, copy = _bandwidth(device, mb * 2**20, repeats, sync)
    n = (1024 if quick else 2048) * (4 if accel else 1)
    result = {"device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
              "bandwidth_read_gbs": read / 1e9, "bandwidth_copy_gbs": copy / 1e9, "matmul_size": {}, "gflops": {}}
    low = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    kinds = [(name, lambda k, dt=dtype: (lambda a: lambda: a @ a)(torch.randn(k, k, device=device).to(dt)))
             for name, dtype in (("float32", torch.float32), (str(low).removeprefix("torch."), low))]
    kinds.append(("int8", lambda k: (lambda a: lambda: torch._int_mm(a, a))(
        torch.randint(-128, 127, (k, k), dtype=torch.int8, device=device))))
    for name, make in kinds:
        try:
            k = _matmul_size(make, n, sync)
            result["gflops"][name] = 2 * k**3 / _best_time(make(k), sync, repeats) / 1e9
            result["matmul_size"][name] = k
        except (RuntimeError, NotImplementedError) as e:  # torch._int_mm where it does not run
            result["gflops"][name] = None
            result[f"{name}_unsupported"] = str(e).splitlines()[0][:200]
    return result


def decode_bytes(weight_bytes: int, kv_bytes_per_token: int, batch: int, input_len: int, output_len: int) -> float:
    """Bytes one decode step reads on average over the generation: the weights once, and each sequence's cache
    at its mean length over the decode steps."""
    mean_context = input_len + output_len / 2
    return weight_bytes + batch * kv_bytes_per_token * mean_context


def decode_bound_tps(machine: dict, weight_bytes: int, kv_bytes_per_token: int, batch: int, input_len: int,
                     output_len: int) -> float:
    """The most decode tokens/s the memory bandwidth allows (every sequence of the batch gains a token per step)."""
    step = decode_bytes(weight_bytes, kv_bytes_per_token, batch, input_len, output_len)
    return batch * machine["bandwidth_read_gbs"] * 1e9 / step


def matmul_flops_per_token(config, context: float) -> float:
    """FLOPs for one token through the model: 2 per weight of every linear and the lm_head, plus attention's two
    products over `context` positions."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    linear = h * (config.num_heads * d) * 2 + h * (config.num_kv_heads * d) * 2 + 3 * h * i
    return 2 * (config.num_layers * linear + h * config.vocab_size) + 4 * config.num_layers * config.num_heads * d \
        * context


def compute_dtype(engine_dtype: str, quantization: str | None, phase: str) -> str:
    """Which matmul roof applies: int8 for schemes whose GEMMs are int8 x int8 (w8a8; int4-w8a8's prefill), bf16
    for weight-only schemes (their kernels take bf16 activations), else the model's dtype."""
    if quantization == "w8a8" or (quantization == "int4-w8a8" and phase == "prefill"):
        return "int8"
    if quantization:
        return "bfloat16"
    return engine_dtype


def verdict(machine: dict, seconds: float, bytes_moved: float, flops: float, dtype: str) -> dict:
    """Memory- or compute-bound, and how close the measured time comes to the roof that binds."""
    bw = machine["bandwidth_read_gbs"] * 1e9
    peak = (machine["gflops"].get(dtype) or machine["gflops"]["float32"]) * 1e9
    t_mem, t_compute = bytes_moved / bw, flops / peak
    bound = "memory" if t_mem >= t_compute else "compute"
    return {"bound": bound, "bytes": bytes_moved, "flops": flops, "intensity_flop_per_byte": flops / bytes_moved,
            "machine_balance_flop_per_byte": peak / bw, "roof_seconds": max(t_mem, t_compute),
            "measured_seconds": seconds, "fraction_of_roof": max(t_mem, t_compute) / seconds, "dtype": dtype}


def format_machine(m: dict) -> str:
    sizes = m.get("matmul_size", {})
    flops = ", ".join(f"{k} {v:.0f} ({sizes.get(k, '?')}^3)" if v else f"{k} n/a" for k, v in m["gflops"].items())
    return (f"{m['device_name']} ({m['device']}, {m['threads']} threads): memory read {m['bandwidth_read_gbs']:.1f} "
            f"GB/s, copy {m['bandwidth_copy_gbs']:.1f} GB/s; matmul GFLOP/s (size^3): {flops}")
