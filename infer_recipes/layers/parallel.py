"""What one rank holds of a model split across devices, and the two collectives its layers need.

Tensor parallel (Megatron-style): a column-parallel linear holds a slice of the output features (q/k/v heads,
gate/up columns) and needs no communication; a row-parallel linear holds the matching slice of the input features
(o_proj, down_proj) and produces a partial sum that one all-reduce completes, so each attention block and each MLP
costs one all-reduce. The vocabulary is split into equal ranges (the last padded): the embedding looks up the
tokens in its range and an all-reduce assembles the rows; the lm_head computes its range's logits and an
all-gather concatenates them.

Pipeline parallel: a rank holds contiguous decoder layers [first_layer, end_layer); the first stage holds the
embedding, the last the final norm and the lm_head.

The collectives are c10d's own when eager; inside a `torch.compile`d layer the functional ones, which it traces
into its graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shard:
    tp_rank: int = 0
    tp_size: int = 1
    group: Any = None  # the tensor-parallel process group (None when tp_size is 1)
    first_layer: int = 0
    end_layer: int | None = None  # None: through the last layer
    first_stage: bool = True
    last_stage: bool = True

    def layer_range(self, num_layers: int) -> range:
        return range(self.first_layer, num_layers if self.end_layer is None else self.end_layer)

    def split(self, total: int) -> tuple[int, int]:
        """This rank's [start, end) of `total` items split evenly (the caller has checked divisibility)."""
        size = total // self.tp_size
        return self.tp_rank * size, (self.tp_rank + 1) * size

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """This rank's KV heads: an even split, or the one head its query heads share when there are fewer KV
        heads than ranks (then replicated on tp_size / num_kv_heads ranks)."""
        if num_kv_heads >= self.tp_size:
            return self.split(num_kv_heads)
        head = self.tp_rank * num_kv_heads // self.tp_size
        return head, head + 1

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """This rank's vocabulary range, ceil(V / tp) rows each; the last range may run past V (padding)."""
        size = -(-vocab_size // self.tp_size)
        return self.tp_rank * size, (self.tp_rank + 1) * size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel ranks; `x` (a fresh activation) is reduced in place when eager."""
        if self.tp_size == 1:
            return x
        if not torch.compiler.is_compiling():  # eager: the functional form's tensor subclass costs ~0.25 ms/call
            torch.distributed.all_reduce(x, group=self.group)
            return x
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(x, "sum", self.group))

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., tp * n], rank order."""
        if self.tp_size == 1:
            return x
        if not torch.compiler.is_compiling():
            parts = [torch.empty_like(x) for _ in range(self.tp_size)]
            torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
            return torch.cat(parts, dim=-1)
        import torch.distributed._functional_collectives as funcol

        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.12
        return funcol.wait_tensor(gather(x.contiguous(), x.dim() - 1, self.group))


def check_split(num_heads: int, num_kv_heads: int, intermediate_size: int, num_layers: int, tp: int,
                pp: int) -> str | None:
    """Why a model cannot be split tp x pp ways, or None when it can."""
    if num_heads % tp:
        return f"{num_heads} attention heads do not divide among {tp} tensor-parallel ranks"
    if num_kv_heads % tp and tp % num_kv_heads:
        return (f"{num_kv_heads} KV heads can neither be split among nor replicated evenly over {tp} "
                f"tensor-parallel ranks")
    if intermediate_size % tp:
        return f"the MLP's {intermediate_size} columns do not divide among {tp} tensor-parallel ranks"
    if pp > num_layers:
        return f"{num_layers} layers cannot fill {pp} pipeline stages"
    return None


def stage_layers(num_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """[first, end) of the contiguous layers stage `stage` holds; earlier stages take the remainder (the last
    stage also runs the final norm and lm_head)."""
    base, extra = divmod(num_layers, pp)
    first = stage * base + min(stage, extra)
    return first, first + base + (1 if stage < extra else 0)
