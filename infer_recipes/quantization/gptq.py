"""GPTQ (Frantar et al., 2023) for our int4 form: each weight column is rounded in turn and its rounding error is
spread over the columns not yet rounded, weighted by the inverse Hessian of the layer's output error,
H = X^T X over the inputs X the calibration text gave that linear. Round-to-nearest leaves each weight's error
where it falls; GPTQ lets the remaining columns absorb it, so the *output* X W^T moves less.

The grid is the kernel's: group-wise asymmetric (q - 8) * scale + zero, q in [0, 15], scale and zero bfloat16-
representable (`Int4Linear.grid`), each group's grid fixed from its (already corrected) weights when the first
column of the group is reached. The result is the codes, scales and zeros themselves: min-max rounding at load
could not reproduce a grid whose end codes no weight uses, so a checkpoint keeps them (`pack` / `unpack`).

Hessians are collected a few decoder layers at a time (`plan_passes`: a 1.5B model's down_proj alone needs
8,960^2 floats); the layers already rounded stay rounded in the float model, so later layers' Hessians see the
inputs the quantized model gives them. Inside one pass the layers see float inputs. A linear whose
round-to-nearest codes score a lower output error on the calibration inputs keeps those (a GGUF Q4 file's weights
already sit on a 4-bit grid that min-max rounding finds exactly); the lm_head keeps GPTQ's only where, fit on part
of the calibration text, they predict the rest's next tokens better (`round_head`). Columns are rounded in
activation order on grids fixed up front (act-order with static groups), so the kernel's groups stay consecutive
columns."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .api import skipped
from .int4 import Int4Linear, _expand

# the linears of a decoder layer grouped by the input they read (first name: where the Hessian is recorded)
READERS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def gptq(w: torch.Tensor, h: torch.Tensor, group_size: int, damp: float = 0.01, block: int = 128,
         act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, K] uint8, scales, zeros [N, K / group]) of float weight `w` [N, K] against Hessian `h` [K, K].

    `damp` (a fraction of H's mean diagonal) keeps the inverse well conditioned; `block` columns are corrected
    at a time before their error is pushed onto the rest in one matmul (the lazy batch update). With `act_order`
    the columns are rounded in order of decreasing H diagonal (the inputs with the most energy first, while the
    most columns remain to absorb their error) on grids fixed up front from the uncorrected weights ("static
    groups"): the kernel's groups stay consecutive columns whatever the order."""
    w = w.detach().float().clone()
    N, K = w.shape
    h = h.detach().double().clone()
    dead = h.diagonal() == 0  # an input channel the text never moved: its weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    scales = torch.empty(N, K // group_size)
    zeros = torch.empty(N, K // group_size)
    if act_order:
        grids = Int4Linear.grid(w.view(N, K // group_size, group_size))
        scales.copy_(grids[0])
        zeros.copy_(grids[1])
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    else:
        order = torch.arange(K)
    columns, groups = order.tolist(), (order // group_size).tolist()  # in the order rounded
    # the upper Cholesky factor of H^-1: row i holds what column i's error does to the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.empty(N, K, dtype=torch.uint8)
    block = max(group_size, block // group_size * group_size)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        w1 = w[:, i1:i2]  # a view: corrected in place
        h1 = hinv[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            g = groups[col]
            if not act_order and col % group_size == 0:
                scales[:, g], zeros[:, g] = Int4Linear.grid(w1[:, i:i + group_size])
            s, z = scales[:, g], zeros[:, g]
            qi = Int4Linear.codes(w1[:, i], s, z)
            q[:, columns[col]] = qi
            e = (w1[:, i] - ((qi.float() - 8) * s + z)) / h1[i, i]
            w1[:, i:].addr_(e, h1[i, i:], alpha=-1)
            err[:, i] = e
        w[:, i2:].addmm_(err, hinv[i1:i2, i2:], alpha=-1)
    return q, scales, zeros


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the summed squared output error on the inputs H was collected from."""
    e = (w.float() - wq.float())
    return float((e @ h.float() * e).sum())


def pack(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte (column 2j low, 2j + 1 high): [N, K] -> [N, K / 2]."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).view(p.shape[0], -1)


def readers(model: nn.Module, layers, head: bool, skip=()) -> dict[str, list[str]]:
    """For the decoder `layers` (and the lm_head with `head`): the linear whose input is recorded -> the linears
    not skipped that read that input."""
    found = {}
    for i in layers:
        for names in READERS:
            kept = [f"model.layers.{i}.{n}" for n in names if not skipped(f"model.layers.{i}.{n}", skip)]
            if kept:
                found[f"model.layers.{i}.{names[0]}"] = kept
    if head and type(getattr(model, "lm_head", None)) is nn.Linear and not skipped("lm_head", skip):
        found["lm_head"] = ["lm_head"]
    return found


class Hessians:
    """Forward hooks accumulating X^T X (float32) of the input of each reader linear."""

    def __init__(self, model: nn.Module, reader_names, keep=()):
        self.h: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.kept: dict[str, list[torch.Tensor]] = {name: [] for name in keep}  # the inputs themselves
        self.handles = [model.get_submodule(r).register_forward_hook(self._hook(r)) for r in reader_names]

    def _hook(self, name: str):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in self.h:
                self.h[name] = torch.zeros(x.shape[1], x.shape[1])
                self.rows[name] = 0
            self.h[name].addmm_(x.t(), x)
            self.rows[name] += x.shape[0]
            if name in self.kept:
                self.kept[name].append(x.clone())
        return record

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def plan_passes(model: nn.Module, budget_bytes: int) -> list[list[int]]:
    """Consecutive decoder layers per calibration pass, as many as keep their Hessians within `budget_bytes`
    (at least one a pass); the lm_head's joins the last."""
    passes, current, used = [], [], 0
    for i, layer in enumerate(model.model.layers):
        need = sum(layer.get_submodule(names[0]).in_features ** 2 * 4 for names in READERS)
        if current and used + need > budget_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(i)
        used += need
    return passes + [current] if current else passes


@dataclass(frozen=True)
class Rounded:
    """One linear's rounding (GPTQ's, or round-to-nearest's where that scored better on the calibration inputs)
    and its output error against round-to-nearest's there."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    error: float
    error_rtn: float


def cross_entropy(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, rows: int = 4096) -> float:
    """Mean next-token cross-entropy of logits x W^T against `targets` (-100: no target), on at most `rows` rows
    spread evenly over x."""
    pick = torch.linspace(0, x.shape[0] - 1, min(rows, x.shape[0])).long()
    pick = pick[targets[pick] >= 0]
    total = 0.0
    for i in range(0, len(pick), 512):
        p = pick[i:i + 512]
        total += float(torch.nn.functional.cross_entropy(x[p] @ w.t(), targets[p], reduction="sum"))
    return total / max(len(pick), 1)


@torch.no_grad()
def quantize_model(model: nn.Module, run_text: Callable[[], None], group_size: int, skip=(),
                   budget_bytes: int = 2 << 30, progress: bool = True,
                   targets: torch.Tensor | None = None) -> dict[str, Rounded]:
    """GPTQ of every decoder linear and the lm_head, those not skipped (checkpoint name -> `Rounded`), calling
    `run_text()` (the calibration text through the model) once per pass of `plan_passes`. Each rounded decoder
    weight replaces the float one in `model` (dequantized), so later passes see the inputs the int4 model gives
    and the saved float weights are what the int4 model computes with; the lm_head's float weight stays (when
    tied it is the embedding table)."""
    done: dict[str, Rounded] = {}
    passes = plan_passes(model, budget_bytes)
    for n, layers in enumerate(passes):
        if progress:
            print(f"GPTQ pass {n + 1} of {len(passes)}: layers {layers[0]}-{layers[-1]}", file=sys.stderr)
        found = readers(model, layers, n == len(passes) - 1, skip)
        hs = Hessians(model, found, keep=("lm_head",) if targets is not None else ())
        try:
            run_text()
        finally:
            hs.close()
        todo = [(name, reader) for reader, names in found.items() for name in names
                if reader in hs.h and model.get_submodule(name).in_features % group_size == 0]
        for name, reader in tqdm(todo, desc="GPTQ", unit="linear", disable=not progress, file=sys.stderr,
                                 leave=False):
            linear = model.get_submodule(name)
            h = hs.h[reader] / hs.rows[reader]
            w = linear.weight.detach().float()
            rtn = Int4Linear.quantize(w, group_size)
            if name == "lm_head" and hs.kept.get(name):
                q, s, z = round_head(w, hs.kept[name], targets, group_size, rtn)
            else:
                q, s, z = gptq(w, h, group_size)
            wq = _expand(q, s, z, group_size)
            error, error_rtn = output_error(w, wq, h), output_error(w, _expand(*rtn, group_size), h)
            if error_rtn < error and name != "lm_head":
                (q, s, z), wq, error = rtn, _expand(*rtn, group_size), error_rtn
            done[name] = Rounded(q, s, z, error, error_rtn)
            if name != "lm_head":  # (nothing reads its output; a tied head's weight is the embedding table too)
                linear.weight.copy_(wq.to(linear.weight.dtype))
        hs.h.clear()
        hs.kept.clear()
    return done


def round_head(w: torch.Tensor, windows: list[torch.Tensor], targets: torch.Tensor, group_size: int,
               nearest: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lm_head's codes: GPTQ's, fit on the first three quarters of the calibration windows (`windows`: the
    head's input rows of each, in the order `targets` holds their next tokens), if they predict the last quarter's
    next tokens better than round-to-nearest's (`nearest`); otherwise those. The squared logit error is a poor
    proxy for the head, and so is the text it was fit on: on Qwen2.5-Coder-0.5B GPTQ cut the logit error by 4x on
    text it never saw and still predicted that text worse than round-to-nearest."""
    n_fit = len(windows) - max(1, len(windows) // 4)
    if n_fit < 1:
        return nearest
    fit, held = torch.cat(windows[:n_fit]), torch.cat(windows[n_fit:])
    q, s, z = gptq(w, fit.t() @ fit / len(fit), group_size)
    t = targets[len(fit):len(fit) + len(held)]
    if cross_entropy(held, _expand(q, s, z, group_size), t) < cross_entropy(held, _expand(*nearest, group_size), t):
        return q, s, z
    return nearest
