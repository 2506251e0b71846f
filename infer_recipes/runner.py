"""Turning a scheduled step into tensors, running the model on it, and owning the paged KV pool.

A step is a list of sequences, each with the tokens it computes now (a whole prompt, a chunk of one, or one decode
token), laid end to end into one [1, N] batch: every linear layer runs once over all N tokens, and only attention
looks at sequence boundaries (through `PagedMetadata`). Keys and values live in a pool of fixed-size blocks per
layer; a sequence's block table says which blocks hold its tokens.

With `compile` on, every decoder layer goes through one `torch.compile`d function whose only dynamic dimension is
the token count N; paged attention is one opaque custom op inside it, so how the N tokens split into sequences
never reaches the graph. Sizes of 1 are specialised by the compiler, so N = 1 and N > 1, each for the first layer
(no residual yet) and the others, make 4 graphs; `warm_up` compiles them all, and `compiles` counts every
compilation so a recompile cannot hide.
"""
from __future__ import annotations

import functools
import itertools
import types
from dataclasses import dataclass

import numpy as np
import torch

from .distributed import ParallelContext
from .layers.attention import PagedMetadata
from .models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class StepSeq:
    """What the runner needs of one scheduled sequence."""

    token_ids: list[int]  # the tokens computed this step
    start: int  # position of the first of them
    block_table: list[int]  # blocks holding positions [0, start + len(token_ids)) (empty without a KV cache)
    sample: bool  # return logits for the last token


class KVPool:
    """Each layer's keys and values as [num_blocks, H_kv, block_size, D] (a block is a [block_size, D] matrix
    per head, what the decode GEMMs read in place).

    On the CPU the pool is zero pages from the OS (numpy's calloc): memory is committed only as blocks are first
    written, so a pool sized for the worst case costs what is used. Blocks are reused most-recent-first."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers = [(self._zeros(shape, dtype, device), self._zeros(shape, dtype, device))
                       for _ in range(num_layers)]

    @staticmethod
    def _zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        size = torch.empty((), dtype=dtype).element_size()
        raw = np.zeros(shape + (size,), dtype=np.uint8)
        return torch.from_numpy(raw).view(dtype).view(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers for t in pair)


def micro_batches(seqs: list, parts: int) -> list[list]:
    """`seqs` cut into at most `parts` contiguous, non-empty groups of similar token counts (pipeline stages
    overlap on them)."""
    parts = min(parts, len(seqs))
    if parts <= 1:
        return [seqs]
    total, out, current, done = sum(len(s.token_ids) for s in seqs), [], [], 0
    for i, s in enumerate(seqs):
        current.append(s)
        done += len(s.token_ids)
        open_parts, left = parts - len(out) - 1, len(seqs) - i - 1
        if open_parts and (done >= total * (len(out) + 1) / parts or left == open_parts):
            out.append(current)
            current = []
    return out + [current] if current else out


_RUNNER_IDS = itertools.count()


class CompiledLayers:
    """Regional compilation: every decoder layer runs one `torch.compile`d function with dynamic dimensions.

    The layers share their code, so the compiled graphs are shared too: compile time is one layer's, not the whole
    model's (seconds rather than minutes for 30 layers). Embedding, final norm and lm_head stay eager: one op each.
    The backend is Inductor, wrapped to count compilations; after `ModelRunner.warm_up` a count that moves is a
    recompile. fullgraph=True makes a graph break an error instead of a silent slow path.
    """

    def __init__(self, model: LlamaForCausalLM):
        import torch._dynamo

        self.compiles = 0
        # the compiler keeps graphs per code object, and what it learnt about sizes per code name: a private,
        # uniquely named copy of the layer function gives this runner graphs of its own, so another model in the
        # process (other head counts) can neither evict them nor turn their static sizes dynamic
        name = f"run_layer_{next(_RUNNER_IDS)}"
        code = _run_layer.__code__
        names = {"co_name": name, **({"co_qualname": name} if hasattr(code, "co_qualname") else {})}
        run_layer = types.FunctionType(code.replace(**names), _run_layer.__globals__, name)
        # 2 graph classes x (first layer, other layers), more once quantized layers differ: above the default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled = torch.compile(run_layer, backend=self._backend, fullgraph=True)
        for i in model.layer_range:
            layer = model.model.layers[i]
            layer.forward = functools.partial(self, layer)  # the instance's forward; the class's stays eager

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs)

    @staticmethod
    def _mark(t: torch.Tensor | None, dims: tuple[int, ...]) -> None:
        import torch._dynamo

        if t is None:
            return
        for dim in dims:
            # the compiler specialises sizes 0 and 1 (those get their own graph). "maybe": no range is declared,
            # since Inductor bounds some sizes for its own kernel choices (cache length <= 4096 on CPU): a step
            # beyond such a bound recompiles once, and the counter shows it
            if t.shape[dim] >= 2:
                torch._dynamo.maybe_mark_dynamic(t, dim)

    def __call__(self, layer, h, residual, cos, sin, meta: PagedMetadata, kv):
        for t in (h, residual):
            self._mark(t, (1,))  # tokens
        for t in (cos, sin, meta.slot_mapping, meta.plan):
            self._mark(t, (0,))
        return self._compiled(layer, h, residual, cos, sin, meta, kv)


def _run_layer(layer, h, residual, cos, sin, meta, kv):
    return type(layer).forward(layer, h, residual, cos, sin, meta, kv)


class ModelRunner:
    """Runs steps of one model. Split across ranks (`world` given), rank 0's `execute` first sends the step to
    the other ranks, whose worker loop calls `run` with it; `run` is every rank's part: its layers, its slice of
    each, the all-reduces inside the model, and between pipeline stages the activations, micro-batch by
    micro-batch so that stage s works on micro-batch m while stage s+1 works on m-1."""

    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, kv_cache: bool = True,
                 compile: bool = False, num_blocks: int = 0, block_size: int = 16,
                 world: ParallelContext | None = None, model_id: int = 0):
        self.model, self.device, self.dtype, self.kv_cache = model, device, dtype, kv_cache
        self.config = cfg = model.config
        self.block_size = block_size
        self.world, self.model_id = world, model_id
        shard = model.shard
        kv_first, kv_end = shard.kv_heads(cfg.num_kv_heads)
        self.pool = (KVPool(len(model.layer_range), num_blocks, block_size, kv_end - kv_first, cfg.head_dim, dtype,
                            device) if kv_cache else None)
        self.compiled = CompiledLayers(model) if compile else None
        # pipeline neighbours (global ranks; stage-major layout, see distributed.py)
        if world is not None:
            self.prev_rank, self.next_rank = world.rank - shard.tp_size, world.rank + shard.tp_size
            self.pp_size = world.world_size // shard.tp_size
            self.last_stage_head = (self.pp_size - 1) * shard.tp_size  # sends the logits to rank 0

    @property
    def compiles(self) -> int:
        """How many graphs torch.compile has built for this runner (0 when compile is off)."""
        return self.compiled.compiles if self.compiled else 0

    def _inputs(self, seqs: list[StepSeq]):
        """(tokens [1, N], positions [1, N], PagedMetadata) for sequences already ordered decodes first."""
        bs = self.block_size
        tokens, positions, slots = [], [], []
        decodes, prefills = [], []
        for s in seqs:
            n, at = len(s.token_ids), len(tokens)
            tokens += s.token_ids
            positions += range(s.start, s.start + n)
            if self.kv_cache:
                t = s.block_table
                slots += [t[p // bs] * bs + p % bs for p in range(s.start, s.start + n)]
            if self.kv_cache and n == 1:
                decodes.append((s.block_table, s.start + 1))
            else:
                prefills.append((at, n, s.start + n, s.block_table))
        dev = self.device
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev) if self.kv_cache else None
        meta = PagedMetadata.build(decodes, prefills, slot_mapping, bs, dev)
        return (torch.tensor([tokens], dtype=torch.long, device=dev),
                torch.tensor([positions], dtype=torch.long, device=dev), meta)

    @torch.inference_mode()
    def execute(self, seqs: list[StepSeq]) -> torch.Tensor:
        """Runs one step; returns float32 logits [S, V] for the sequences with `sample`, in their given order."""
        if not self.kv_cache and any(s.start for s in seqs):
            raise ValueError("without a KV cache every step must recompute each sequence from position 0")
        return self._drive("execute", seqs)

    def _drive(self, kind: str, payload) -> torch.Tensor:
        """Runs this rank's part; split across ranks, first sends the work to the others (rank 0 only)."""
        if self.world is None:
            return self.run(kind, payload)
        with self.world.command("run", self.model_id, kind, payload):
            return self.run(kind, payload)

    @torch.inference_mode()
    def run(self, kind: str, payload) -> torch.Tensor | None:
        """This rank's part of a step (`execute`: a list of StepSeq) or of a scoring pass (`full_logits`: token
        ids); the logits on rank 0, None elsewhere."""
        if kind == "full_logits":
            n = len(payload)
            meta = PagedMetadata.build([], [(0, n, n, [])], None, self.block_size, self.device)
            tokens = torch.tensor([payload], dtype=torch.long, device=self.device)
            positions = torch.arange(n, device=self.device).unsqueeze(0)
            return self._pipeline([(tokens, positions, meta, list(range(n)))], None, None, n)
        seqs = payload
        order = sorted(range(len(seqs)), key=lambda i: not (self.kv_cache and len(seqs[i].token_ids) == 1))
        ordered = [seqs[i] for i in order]
        batches = []
        for part in micro_batches(ordered, self.pp_size if self.world is not None else 1):
            tokens, positions, meta = self._inputs(part)
            ends = itertools.accumulate(len(s.token_ids) for s in part)
            batches.append((tokens, positions, meta, [e - 1 for e, s in zip(ends, part) if s.sample]))
        sampled = [i for i in order if seqs[i].sample]  # the scored rows come in this order
        where = {i: row for row, i in enumerate(sampled)}
        given = None if sampled == sorted(sampled) else [where[i] for i in sorted(sampled)]
        return self._pipeline(batches, self.pool.layers if self.pool else None, given, len(sampled))

    def _pipeline(self, batches, kv, reorder: list[int] | None, num_rows: int) -> torch.Tensor | None:
        """Runs (tokens, positions, meta, rows to score) batches through this rank's stage; returns, on rank 0,
        the float32 logits of the scored rows (put in `reorder`'s order first, when given)."""
        shard, world = self.model.shard, self.world
        hidden_size = self.config.hidden_size
        scored, sends = [], []
        for tokens, positions, meta, rows in batches:
            hidden = None
            if not shard.first_stage:
                hidden = world.recv((1, tokens.shape[1], hidden_size), self.dtype, self.prev_rank)
            out = self.model(tokens, positions, meta, kv, hidden=hidden)
            if not shard.last_stage:
                sends.append((world.send(out, self.next_rank), out))
            else:
                scored.append(out[0][rows])
        for work, _ in sends:
            work.wait()
        if shard.last_stage:
            if num_rows:
                hidden = scored[0] if len(scored) == 1 else torch.cat(scored)
                logits = self.model.compute_logits(hidden if reorder is None else hidden[reorder])  # one lm_head
            else:  # a step of prefill chunks only: nothing to score
                logits = torch.empty(0, self.config.vocab_size, device=self.device)
            if world is None or world.rank == 0:
                return logits
            if world.rank == self.last_stage_head and num_rows:
                world.send(logits, 0).wait()
            return None
        if world.rank == 0:
            if not num_rows:
                return torch.empty(0, self.config.vocab_size, device=self.device)
            return world.recv((num_rows, self.config.vocab_size), torch.float32, self.last_stage_head)
        return None

    @torch.inference_mode()
    def warm_up(self) -> int:
        """Compiles every graph class once (one token and more, first layer and others); returns the count."""
        if self.compiled is None:
            return 0
        # every rank warms up at load, together: run, not execute
        tables = ([0], [1]) if self.kv_cache else ([], [])
        self.run("execute", [StepSeq([1, 2, 3], 0, tables[0], True)])  # N > 1
        if self.kv_cache:
            self.run("execute", [StepSeq([4], 3, tables[0], True)])  # N = 1: a decode
            self.run("execute", [StepSeq([5], 4, tables[0], True), StepSeq([1, 2], 0, tables[1], True)])
        else:
            self.run("execute", [StepSeq([4], 0, [], True)])
        return self.compiles

    @torch.inference_mode()
    def full_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] for every position of one sequence, without touching the KV pool (evaluation, tests)."""
        return self._drive("full_logits", list(token_ids))
