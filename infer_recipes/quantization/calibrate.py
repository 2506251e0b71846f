"""Calibrated scaling: per-channel factors chosen on activations seen on a calibration text, folded exactly into
the float model before it is quantized, so that a scheme's rounding costs less.

For linears that read one input X through an op P whose output channel j can be divided by s_j (an RMSNorm's
weight; up_proj's output rows, which multiply into down_proj's input), X W^T = (X / s) (W diag(s))^T: dividing P by
s and multiplying W's columns by s leaves the float model unchanged and moves the spread between input channels
from the activations into the weights. Two published choices of s, per group of linears sharing X:

- `w8a8`, SmoothQuant (Xiao et al., 2023): s_j = max|X_j|^a / max|W_j|^(1-a): activation outlier channels shrink,
  so quantizing activations to int8 per token rounds the other channels less.
- `int4` / `int8` weight-only, activation-aware scaling (AWQ, Lin et al., 2024): s_j = mean|X_j|^a: the weight
  columns that meet large activations grow and round with a smaller relative error.

a is chosen per group from a grid over [0, 1] by the output error ||y_quantized - X W^T||^2 of the scheme's own
rounding (the very functions its modules quantize with) on activation rows sampled from the calibration text;
a = 0 is no scaling, so a group's error on those rows never grows. GPTQ, which may follow for int4, is
`quantization.gptq`. Not done: AWQ's weight-clipping search, and scaling v_proj into o_proj (with grouped-query
attention one v row feeds several heads' o_proj columns, so their factors would have to be shared).

Plain torch on an unfused model (`fusion=False`: q/k/v and gate/up as separate linears, checkpoint names)."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .api import skipped
from .int4 import Int4Linear
from .int8 import Int8Linear
from .w8a8 import quantize_per_token

CALIBRATED = ("w8a8", "int4", "int8")  # the schemes a calibrated scaling exists for
GRID = tuple(i / 10 for i in range(1, 11))  # besides a = 0 (no scaling), which is always scored


@dataclass
class Group:
    """Linears that read the same input, and the op whose output channels 1/s folds into."""

    name: str
    linears: tuple[str, ...]
    prev: str
    # what the calibration text showed of the input: per-channel mean and max of |x|, and sampled rows
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    count: int = 0
    rows: torch.Tensor | None = None  # [R, K]
    filled: int = 0  # rows of `rows` written so far


def groups(model: nn.Module, skip=()) -> list[Group]:
    """The scalable groups of each decoder layer: q/k/v after the input norm, gate/up after the post-attention
    norm, down after up. A group with a linear kept in float (`skip`) is left alone."""
    found = []
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}"
        if type(getattr(model.get_submodule(f"{p}.self_attn"), "q_proj", None)) is not nn.Linear:
            raise ValueError("calibration needs the unfused model (fusion=False), in float")
        for g in (Group(f"{p}.attn", tuple(f"{p}.self_attn.{n}_proj" for n in "qkv"), f"{p}.input_layernorm"),
                  Group(f"{p}.mlp", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), f"{p}.post_attention_layernorm"),
                  Group(f"{p}.down", (f"{p}.mlp.down_proj",), f"{p}.mlp.up_proj")):
            if not any(skipped(n, skip) for n in g.linears):
                found.append(g)
    return found


class Recorder:
    """Forward hooks on the first linear of each group: accumulate |x| statistics and keep `max_rows` random rows
    of the `tokens` the text will run, each call its share (seeded: the same text gives the same rows).

    The rows go into one buffer per group, allocated once: thousands of small tensors kept between the large
    temporaries of each forward fragmented the heap (the 0.5B's calibration grew by ~250 MB a window)."""

    def __init__(self, model: nn.Module, found: list[Group], max_rows: int, tokens: int, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.max_rows, self.tokens = max_rows, tokens
        self.handles = [model.get_submodule(g.linears[0]).register_forward_hook(self._hook(g)) for g in found]

    def _hook(self, g: Group):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            a = x.abs()
            if g.abs_sum is None:
                g.abs_sum, g.abs_max = a.sum(0, dtype=torch.float64), a.amax(0).float()
                g.rows = torch.empty(self.max_rows, x.shape[1])
            else:
                g.abs_sum += a.sum(0, dtype=torch.float64)
                torch.maximum(g.abs_max, a.amax(0).float(), out=g.abs_max)
            del a
            g.count += x.shape[0]
            take = min(math.ceil(x.shape[0] * self.max_rows / self.tokens), x.shape[0], self.max_rows - g.filled)
            if take > 0:
                pick = torch.randperm(x.shape[0], generator=self.gen)[:take]
                g.rows[g.filled:g.filled + take] = x[pick]
                g.filled += take
        return record

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _factor(scheme: str, a: float, g: Group, w: torch.Tensor) -> torch.Tensor:
    if scheme == "w8a8":
        s = g.abs_max.clamp(min=1e-5).pow(a) / w.abs().amax(0).clamp(min=1e-5).pow(1 - a)
    else:
        s = (g.abs_sum / g.count).float().clamp(min=1e-5).pow(a)
    s = s / (s.max() * s.min()).sqrt()  # centred on 1: a common factor changes nothing but the float range
    return s.clamp(min=1e-4, max=1e4)


def quantized_output(scheme: str, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = (x / s) Q(W diag(s))^T with the scheme's own rounding (weights; activations per token for w8a8)."""
    ws = w * s
    if scheme == "w8a8":
        xq, xs = quantize_per_token(x / s)
        q, ss = Int8Linear.quantize(ws)  # as W8A8Linear holds it
        return (xq.float() * xs) @ (q.float() * ss[:, None]).t()
    if scheme == "int8":
        q, ss = Int8Linear.quantize(ws)
        wq = q.float() * ss[:, None]
    else:
        wq = Int4Linear.fake(ws, group_size)
    return x @ (wq / s).t()


@dataclass(frozen=True)
class Choice:
    group: str
    alpha: float
    error: float  # output error with the chosen factors, summed over the sampled rows
    error_unscaled: float  # the same without scaling (a = 0)


def search(model: nn.Module, found: list[Group], scheme: str, group_size: int = 32, grid=GRID,
           progress: bool = True) -> tuple[dict[str, torch.Tensor], list[Choice]]:
    """The factors of each group (name -> s [K]) with the alpha that gave the least output error."""
    factors, choices = {}, []
    for g in tqdm(found, desc=f"searching scales ({scheme})", unit="group", disable=not progress, file=sys.stderr,
                  leave=False):
        w = torch.cat([model.get_submodule(n).weight.detach().float() for n in g.linears])
        if scheme == "int4" and w.shape[1] % group_size:
            continue  # such a layer stays float when quantized
        x = g.rows[:g.filled]
        ref = x @ w.t()
        ones = torch.ones(w.shape[1])
        unscaled = (quantized_output(scheme, x, w, ones, group_size) - ref).pow(2).sum().item()
        best = (unscaled, 0.0, ones)
        for a in grid:
            if a == 0:
                continue
            s = _factor(scheme, a, g, w)
            err = (quantized_output(scheme, x, w, s, group_size) - ref).pow(2).sum().item()
            if err < best[0]:
                best = (err, a, s)
        factors[g.name] = best[2]
        choices.append(Choice(g.name, best[1], best[0], unscaled))
    return factors, choices


@torch.no_grad()
def apply(model: nn.Module, found: list[Group], factors: dict[str, torch.Tensor]) -> None:
    """Folds each group's factors in: the linears' columns times s, the previous op's output channels over s.
    Exact in real arithmetic; in float32 to rounding."""
    for g in found:
        s = factors.get(g.name)
        if s is None:
            continue
        for n in g.linears:
            w = model.get_submodule(n).weight
            w.copy_((w.float() * s).to(w.dtype))
        prev = model.get_submodule(g.prev)
        if isinstance(prev, nn.Linear):  # rows: each output channel of prev
            prev.weight.copy_((prev.weight.float() / s[:, None]).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
        else:  # an RMSNorm: its weight multiplies each channel
            prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
