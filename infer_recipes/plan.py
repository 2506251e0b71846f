"""The deployment planner: for a model on N devices, which layouts fit (one device, tensor parallel, pipeline
parallel, both), with how much memory per device, the largest batch and context, and a roofline estimate of decode
latency and throughput.

The model of a decode step (every figure per device, bytes over the bandwidth that moves them):
- weights: a TP rank holds 1/tp of every linear (column-parallel QKV and gate-up, row-parallel output and down),
  1/tp of the vocabulary (embedding and lm_head), all of the norms; a PP stage holds its contiguous layers, the
  embedding on the first stage and the lm_head on the last;
- KV cache per token: the stage's layers x 2 x the rank's KV heads (kv_heads / tp, or one replicated head when there
  are fewer KV heads than ranks) x head_dim x bytes;
- a decode step reads the stage's weights once and each sequence's cache: time = bytes / memory bandwidth;
- tensor parallel adds two all-reduces per layer (after attention, after the MLP) of batch x hidden activations:
  ring all-reduce time = 2 (tp - 1) / tp x bytes / link bandwidth + 2 (tp - 1) x link latency;
- pipeline parallel sends activations between consecutive stages (bytes / link + latency) and splits the batch
  into min(pp, batch) micro-batches; an iteration (one token for every sequence) takes max(pp, micro-batches)
  stage times plus the hand-offs, and every micro-batch re-reads the stage's weights: in weight-bound decoding PP
  buys memory capacity, not speed.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import InferRecipesError
from .quantization.api import BYTES_PER_WEIGHT
from .runner.kv_cache import kv_bytes_per_token as runner_kv_bytes
from .runner.kv_cache import kv_element_size

# bytes per weight: the float formats, and the quantized schemes the planner offers (quantization owns their sizes)
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0,
                **{k: BYTES_PER_WEIGHT[k] for k in ("int8", "w8a8", "int4")}}
KV_DTYPES = ("float32", "bfloat16", "float16", "int8")  # what the KV cache may store (int8 with its scales)


@dataclass(frozen=True)
class Hardware:
    devices: int
    memory_gb: float  # per device, GB (1e9 bytes)
    bandwidth_gbs: float  # memory bandwidth per device, GB/s
    link_gbs: float  # device-to-device bandwidth, GB/s (per direction)
    link_latency_us: float = 10.0
    utilization: float = 0.9  # share of device memory the plan may use (the rest: runtime, fragmentation)
    activation_reserve_gb: float = 1.0  # per device, for activations and workspaces
    efficiency: float = 1.0  # the fraction of the bandwidth roof the kernels reach (1: the roof itself)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    fits: bool
    why: str
    weight_gb: float  # per device (the largest stage)
    kv_mb_per_token: float  # per device (the largest stage)
    kv_tokens: int  # tokens of KV cache the free memory holds, per device
    max_batch: int  # sequences of `context` tokens that fit
    max_context: int  # the longest single sequence that fits (capped at the model's context)
    latency_ms: float | None  # per decode token at `batch`
    tokens_per_s: float | None  # decode throughput at `batch`
    comm_ms: float | None  # of the latency: all-reduces and stage hand-offs

    @property
    def name(self) -> str:
        if self.tp == 1 and self.pp == 1:
            return "single device"
        return " x ".join(p for p in (f"TP={self.tp}" if self.tp > 1 else "", f"PP={self.pp}" if self.pp > 1 else "")
                          if p)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def weight_bytes(c: ModelConfig, scheme: str, tp: int = 1, pp: int = 1) -> float:
    """Bytes of weights on the most loaded device of a tp x pp layout."""
    if scheme not in WEIGHT_BYTES:
        raise InferRecipesError(f"unknown weight format {scheme!r}: choose one of {', '.join(WEIGHT_BYTES)}")
    per_weight = WEIGHT_BYTES[scheme]
    h, d = c.hidden_size, c.head_dim
    q = h * c.num_heads * d / tp
    kv = 2 * h * _kv_heads_per_rank(c, tp) * d
    layer = (q * 2 + kv + 3 * h * c.intermediate_size / tp) * per_weight + 2 * h * 2  # + two bf16 norms
    layers = math.ceil(c.num_layers / pp)
    vocab = c.vocab_size * h / tp
    embed = vocab * per_weight  # quantized in our engine too (int8 per row); fp formats as they are
    head = 0.0 if c.tie_word_embeddings and pp == 1 else vocab * per_weight
    ends = embed + head + h * 2 if pp == 1 else max(embed, head + h * 2)  # the final norm with the lm_head
    return layers * layer + ends


def _kv_heads_per_rank(c: ModelConfig, tp: int) -> float:
    """KV heads split over the ranks, or one replicated head per rank when there are fewer heads than ranks."""
    return c.num_kv_heads / tp if c.num_kv_heads >= tp else 1


def kv_bytes_per_token(c: ModelConfig, kv_dtype: str, tp: int = 1, pp: int = 1) -> float:
    """Of the most loaded device: its stage's layers and its KV heads."""
    element = kv_element_size(getattr(torch, kv_dtype), c.head_dim)
    return runner_kv_bytes(c, element, _kv_heads_per_rank(c, tp), math.ceil(c.num_layers / pp))


def _allreduce_s(nbytes: float, tp: int, hw: Hardware) -> float:
    if tp == 1:
        return 0.0
    return 2 * (tp - 1) / tp * nbytes / (hw.link_gbs * 1e9) + 2 * (tp - 1) * hw.link_latency_us * 1e-6


def layout(c: ModelConfig, hw: Hardware, tp: int, pp: int, scheme: str, kv_dtype: str, batch: int,
           context: int) -> Layout:
    refused = (f"{c.num_heads} heads do not split over {tp} ranks" if c.num_heads % tp else
               f"{c.num_kv_heads} KV heads do not split over {tp} ranks" if c.num_kv_heads >= tp and
               c.num_kv_heads % tp else f"{pp} stages for {c.num_layers} layers" if pp > c.num_layers else "")
    if refused:  # nothing to size: the layout cannot be built
        return Layout(tp, pp, False, refused, 0, 0, 0, 0, 0, None, None, None)
    w = weight_bytes(c, scheme, tp, pp)
    kv = kv_bytes_per_token(c, kv_dtype, tp, pp)
    budget = hw.memory_gb * 1e9 * hw.utilization - hw.activation_reserve_gb * 1e9
    free = budget - w
    tokens = int(free // kv) if free > 0 else 0
    max_context = min(tokens, c.max_position_embeddings)
    max_batch = tokens // context if context else 0
    fits = free > 0 and max_batch >= 1
    why = "" if fits else (f"weights {w / 1e9:.1f} GB exceed the {budget / 1e9:.1f} GB usable per device" if free <= 0
                           else f"room for {tokens} KV tokens, less than one {context}-token sequence")
    latency = throughput = comm = None
    if fits:
        b = min(batch, max_batch)
        m = min(pp, b)  # micro-batches: as many as stages, at most one per sequence
        act = b / m * c.hidden_size * 2  # bf16 activations of one micro-batch
        layers = math.ceil(c.num_layers / pp)
        stage_comm = 2 * layers * _allreduce_s(act, tp, hw)
        stage = (w + b / m * context * kv) / (hw.bandwidth_gbs * 1e9 * hw.efficiency) + stage_comm
        hops = (pp - 1) * (act / (hw.link_gbs * 1e9) + hw.link_latency_us * 1e-6)
        iteration = max(pp, m) * stage + hops  # every sequence gains one token per iteration
        latency, throughput = iteration, b / iteration
        comm = max(pp, m) * stage_comm + hops
    return Layout(tp, pp, fits, why, w / 1e9, kv / 1e6, tokens, max_batch, max_context,
                  None if latency is None else latency * 1e3, throughput, None if comm is None else comm * 1e3)


def plan(c: ModelConfig, hw: Hardware, scheme: str = "bfloat16", kv_dtype: str = "bfloat16", batch: int = 1,
         context: int = 4096) -> list[Layout]:
    """Every tp x pp layout that uses at most `devices` devices, tp and pp dividing it."""
    if hw.devices < 1 or hw.memory_gb <= 0 or hw.bandwidth_gbs <= 0 or hw.link_gbs <= 0:
        raise InferRecipesError("--devices, --device-memory, --bandwidth and --link must be positive")
    if not 0 < hw.efficiency <= 1:
        raise InferRecipesError(f"--efficiency must be in (0, 1], got {hw.efficiency}")
    if batch < 1 or context < 1:
        raise InferRecipesError("--batch and --context must be positive")
    if kv_dtype not in KV_DTYPES:
        raise InferRecipesError(f"unknown KV dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
    out = []
    for tp in _divisors(hw.devices):
        for pp in _divisors(hw.devices // tp):
            if tp * pp in (1, hw.devices):  # one device, or all of them
                out.append(layout(c, hw, tp, pp, scheme, kv_dtype, batch, context))
    return out


def calibrate(path: str | Path) -> dict:
    """This machine's measured bandwidth, and the median fraction of the roof our decode reached, from a
    `bench roofline` (or latency / sweep) results.json."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        machine = result["machine"]
        fractions = sorted(r["roofline_fraction"] for r in result.get("rows", []) if r.get("roofline_fraction")
                           and r.get("kind", "ours") == "ours")
        return {"bandwidth_gbs": float(machine["bandwidth_read_gbs"]), "device_name": machine["device_name"],
                "efficiency": fractions[len(fractions) // 2] if fractions else None}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InferRecipesError(f"--calibrate {path}: not a bench results.json with roofline numbers ({e})") from None


def to_json(layouts: list[Layout], hw: Hardware) -> dict:
    return {"hardware": asdict(hw), "layouts": [{"name": lay.name, **asdict(lay)} for lay in layouts]}


def assumptions(hw: Hardware, scheme: str, kv_dtype: str, batch: int, context: int) -> list[str]:
    return [f"{hw.devices} device(s) of {hw.memory_gb:g} GB, {hw.utilization:.0%} usable less "
            f"{hw.activation_reserve_gb:g} GB for activations; memory bandwidth {hw.bandwidth_gbs:g} GB/s per device; "
            f"links {hw.link_gbs:g} GB/s, {hw.link_latency_us:g} us per message",
            "kernels at the bandwidth roof" if hw.efficiency == 1 else
            f"kernels at {hw.efficiency:.0%} of the bandwidth roof",
            f"weights {scheme} ({WEIGHT_BYTES[scheme]:.3f} bytes per weight with scales), KV cache {kv_dtype}, "
            f"activations bf16",
            f"decode estimate at batch {batch} (or the most that fits) with {context}-token sequences: bytes read / "
            "(bandwidth x efficiency) + ring all-reduces (2 per layer, TP) + stage hand-offs (PP, micro-batches = "
            "min(pp, batch))"]


def format_table(model: str, layouts: list[Layout], hw: Hardware, scheme: str, kv_dtype: str, batch: int,
                 context: int) -> str:
    lines = [f"{model} on up to {hw.devices} device(s) of {hw.memory_gb:g} GB", "",
             "| layout | fits | weights GB / device | KV MB / token / device | KV tokens / device | "
             f"max batch @{context} | max context | decode ms / token | tokens/s | of which comm ms |",
             "|" + " --- |" * 10]
    for lay in layouts:
        if not lay.fits and lay.weight_gb == 0:
            lines.append(f"| {lay.name} | no: {lay.why} |" + " |" * 8)
            continue
        est = (f"{lay.latency_ms:.2f} | {lay.tokens_per_s:.1f} | {lay.comm_ms:.2f}" if lay.fits else "- | - | -")
        lines.append(f"| {lay.name} | {'yes' if lay.fits else 'no: ' + lay.why} | {lay.weight_gb:.2f} | "
                     f"{lay.kv_mb_per_token:.3f} | {lay.kv_tokens:,} | {lay.max_batch} | {lay.max_context:,} | {est} |")
    return "\n".join(lines + ["", "Assumptions:"] + [f"- {a}" for a in assumptions(hw, scheme, kv_dtype, batch,
                                                                                      context)])
