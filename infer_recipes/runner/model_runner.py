"""A scheduled step in, sampled token ids out: tensors from the step's sequences, the model's forward pass over
the paged KV cache, and sampling.

A step is a list of sequences, each with the tokens it computes now (a whole prompt, a chunk of one, or one decode
token), laid end to end into one [1, N] batch: every linear layer runs once over all N tokens, and only attention
looks at sequence boundaries (through `PagedMetadata`). Keys and values live in the KV cache's blocks; a
sequence's block table says which blocks hold its tokens.

Split across ranks (`world` given), rank 0's `execute` first sends the step to the other ranks, whose worker loop
(runner/worker.py) calls `run` with it; `run` is every rank's part: its layers, its slice of each, the
all-reduces inside the model, and between pipeline stages the activations (runner/pipeline.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..distributed import ParallelContext
from ..layers.attention import PagedMetadata
from ..models.llama import LlamaForCausalLM
from .compiled import CompiledLayers
from .kv_cache import KVCache, kv_bytes_per_token, kv_element_size
from .pipeline import micro_batches, run_stage, stages
from .sampling import Sampled, SampleRequest, sample_each, verify


@dataclass(frozen=True)
class StepSeq:
    """What the runner needs of one scheduled sequence."""

    token_ids: list[int]  # the tokens computed this step
    start: int  # position of the first of them
    block_table: list[int]  # blocks holding positions [0, start + len(token_ids)) (empty without a KV cache)
    sample: bool  # return logits for the last token
    draft: int = 0  # speculative decoding: the last `draft` token_ids are proposals, scored and verified too
    decode: bool = False  # tokens after a context run as decode rows (a draft model catching up: `_decode_rows`)


class ModelRunner:
    """Runs steps of one model (or of this rank's part of it). Built by runner/build.py, which also sets what
    describes the model: `source`, `model_config`, `max_model_len`, `load_seconds`, `compile_seconds`."""

    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, kv_cache: bool = True,
                 num_blocks: int = 0, block_size: int = 16,
                 world: ParallelContext | None = None, model_id: int = 0, kv_dtype: torch.dtype | None = None):
        self.model, self.device, self.dtype, self.kv_cache = model, device, dtype, kv_cache
        self.kv_dtype = kv_dtype or dtype  # what the KV pool stores (int8: quantized per token and head)
        self.config: ModelConfig = model.config
        self.block_size = block_size
        self.world, self.model_id = world, model_id
        kv_first, kv_end = model.shard.kv_heads(self.config.num_kv_heads)
        self.cache = (KVCache(len(model.layer_range), num_blocks, block_size, kv_end - kv_first,
                              self.config.head_dim, self.kv_dtype, device) if kv_cache else None)
        self.compiled: CompiledLayers | None = None  # `compile_layers`
        self.owns_weights = True  # False for a runner sharing another's model (build.sharing)

    def compile_layers(self) -> None:
        """Every decoder layer through torch.compile from now on (graphs built at their first call: `warm_up`)."""
        self.compiled = CompiledLayers(self.model)

    @property
    def compiles(self) -> int:
        """How many graphs torch.compile has built for this runner (0 when compile is off)."""
        return self.compiled.compiles if self.compiled else 0

    # ---- rank 0: a step in, sampled tokens out -------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, seqs: list[StepSeq], sampling: list[SampleRequest]) -> list[Sampled | list[Sampled] | str | None]:
        """Runs one step and samples the next token of each sequence with `sample` (their SampleRequests in
        order). Returns per sequence: its Sampled token (a list of them, 1 to draft + 1, for a sequence with draft
        tokens: see sampling.verify), None (a prefill chunk with nothing to sample), or why it failed (a string).
        Should the step fail, each sequence runs again alone, so only the ones that fail by themselves fail: one
        bad request never takes the others down. Re-running rewrites the same keys and values."""
        if not self.kv_cache and any(s.start for s in seqs):
            raise ValueError("without a KV cache every step must recompute each sequence from position 0")
        wanted = {i: request for i, request in zip((i for i, s in enumerate(seqs) if s.sample), sampling)}
        try:
            logits, failed = self._drive("execute", seqs), {}
        except Exception as e:
            logits, failed = self._one_by_one(seqs, e)
        out: list[Sampled | list[Sampled] | str | None] = [failed.get(i) for i in range(len(seqs))]
        first, at = {}, 0  # each scored sequence's first logits row
        for i in wanted:
            if i not in failed:
                first[i], at = at, at + seqs[i].draft + 1
        plain = [i for i in first if not seqs[i].draft]
        if len(plain) < len(first):  # the plain rows among the drafts' rows
            logits_plain = logits[torch.tensor([first[i] for i in plain], dtype=torch.long, device=logits.device)]
        else:
            logits_plain = logits
        for i, pick in zip(plain, sample_each(logits_plain, [wanted[i] for i in plain])):
            out[i] = pick
        for i in first.keys() - set(plain):
            d = seqs[i].draft
            try:
                out[i] = verify(logits[first[i]:first[i] + d + 1], seqs[i].token_ids[-d:], wanted[i])
            except Exception as e:
                out[i] = f"sampling failed: {_describe(e)}"
        return out

    def _one_by_one(self, seqs: list[StepSeq], error: Exception) -> tuple[torch.Tensor, dict[int, str]]:
        """The failed step again, a sequence at a time: (logits of those that ran, {index: why the others
        failed})."""
        if len(seqs) == 1:
            return torch.empty(0, self.config.vocab_size), {0: f"the forward pass failed: {_describe(error)}"}
        rows, failed = [], {}
        for i, seq in enumerate(seqs):
            try:
                logits = self._drive("execute", [seq])
            except Exception as e:
                failed[i] = f"the forward pass failed: {_describe(e)}"
                continue
            if seq.sample:
                rows.append(logits)  # draft + 1 rows
        return (torch.cat(rows) if rows else torch.empty(0, self.config.vocab_size)), failed

    @torch.inference_mode()
    def full_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] for every position of one sequence, without touching the KV cache (evaluation, tests)."""
        return self._drive("full_logits", list(token_ids))

    def _drive(self, kind: str, payload) -> torch.Tensor:
        """Runs this rank's part; split across ranks, first sends the work to the others (rank 0 only)."""
        if self.world is None:
            return self.run(kind, payload)
        with self.world.command("run", self.model_id, kind, payload):
            return self.run(kind, payload)

    # ---- every rank: its part of a step -------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, kind: str, payload) -> torch.Tensor | None:
        """This rank's part of a step (`execute`: a list of StepSeq) or of a scoring pass over token ids without
        the KV cache (`full_logits`: every position scored; `last_logits`: the last); float32 logits of the scored
        rows on rank 0, None elsewhere."""
        if kind in ("full_logits", "last_logits"):
            n = len(payload)
            meta = PagedMetadata.build([], [(0, n, n, [])], None, self.block_size, self.device,
                                       int8_kv=self.kv_cache and self.kv_dtype == torch.int8)
            tokens = torch.tensor([payload], dtype=torch.long, device=self.device)
            positions = torch.arange(n, device=self.device).unsqueeze(0)
            scored = list(range(n)) if kind == "full_logits" else [n - 1]
            return run_stage(self.model, self.world, [(tokens, positions, meta, scored)], None, None, len(scored),
                             self.dtype, self.device)
        seqs = payload
        order = sorted(range(len(seqs)), key=lambda i: not self._decode_rows(seqs[i]))
        ordered = [seqs[i] for i in order]
        batches = []
        for part in micro_batches(ordered, stages(self.world, self.model)):
            tokens, positions, meta = self._inputs(part)
            ends = itertools.accumulate(len(s.token_ids) for s in part)
            batches.append((tokens, positions, meta,
                            [r for e, s in zip(ends, part) if s.sample for r in range(e - 1 - s.draft, e)]))
        # the scored rows come in `order`; they go back in the order of the sequences, a sequence's rows together
        rows = [(i, j) for i in order if seqs[i].sample for j in range(seqs[i].draft + 1)]
        where = {key: row for row, key in enumerate(rows)}
        given = None if rows == sorted(rows) else [where[key] for key in sorted(rows)]
        return run_stage(self.model, self.world, batches, self.cache.layers if self.cache else None, given,
                         len(rows), self.dtype, self.device)

    def _decode_rows(self, s: StepSeq) -> bool:
        """Whether the sequence's tokens go through attention as decode rows: one token, a last token and its draft,
        or tokens marked `decode` (a draft model catching up on the tokens its target kept). Row i reads the pool
        up to its own position (a step writes every row's keys and values before attention reads), so these take
        the decode path (its kernels, a layer in one call) and read the blocks in place instead of gathering the
        context, and a draft is scored with the kernels decoding scores with. Other runs after a context (the
        uncached tail of a cached prompt) stay prefills: quantized kernels round differently at prefill sizes,
        and a cached prompt must give what the uncached one gives."""
        return self.kv_cache and (len(s.token_ids) == 1 or (s.start > 0 and (s.draft > 0 or s.decode)))

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
            if self._decode_rows(s):
                decodes += [(s.block_table, s.start + i + 1) for i in range(n)]
            else:
                prefills.append((at, n, s.start + n, s.block_table))
        dev = self.device
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev) if self.kv_cache else None
        meta = PagedMetadata.build(decodes, prefills, slot_mapping, bs, dev)
        return (torch.tensor([tokens], dtype=torch.long, device=dev),
                torch.tensor([positions], dtype=torch.long, device=dev), meta)

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

    # ---- what the model holds --------------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of the weights as they are held now (quantized ones included, tied ones counted once); 0 for a
        runner sharing another's model (they are that runner's)."""
        if not self.owns_weights:
            return 0
        seen, total = set(), 0
        for t in list(self.model.parameters()) + [b for n, b in self.model.named_buffers() if "rotary" not in n]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def kv_bytes_per_token(self) -> float:
        """Bytes a token's keys and values take in this runner's pool (an int8 pool's scales included)."""
        return kv_bytes_per_token(self.config, kv_element_size(self.kv_dtype, self.config.head_dim))

    def kv_cache_bytes(self) -> int:
        """Bytes reserved for the KV cache (0 without one; on the CPU pages are committed on use)."""
        return self.cache.nbytes() if self.cache is not None else 0


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
