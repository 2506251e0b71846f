"""Running a step through this rank's pipeline stage: micro-batches, activations received from the previous stage
and sent to the next, the lm_head on the last stage and the logits back to rank 0. Without a world (one device)
the same path runs the whole model on one micro-batch."""
from __future__ import annotations

import torch

from ..distributed import ParallelContext
from ..models.llama import LlamaForCausalLM


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


def stages(world: ParallelContext | None, model: LlamaForCausalLM) -> int:
    """How many pipeline stages the model is split into (1 without a world)."""
    return 1 if world is None else world.world_size // model.shard.tp_size


def run_stage(model: LlamaForCausalLM, world: ParallelContext | None, batches, kv, reorder: list[int] | None,
              num_rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Runs (tokens, positions, meta, rows to score) batches through this rank's stage, micro-batch by
    micro-batch, so that stage s works on micro-batch m while stage s+1 works on m-1. Returns, on rank 0, the
    float32 logits of the scored rows (put in `reorder`'s order first, when given); None on the other ranks."""
    shard, config = model.shard, model.config
    if world is not None:  # neighbours in the stage-major rank layout (see distributed.py)
        prev_rank, next_rank = world.rank - shard.tp_size, world.rank + shard.tp_size
        last_stage_head = (stages(world, model) - 1) * shard.tp_size  # sends the logits to rank 0
    scored, sends = [], []
    for tokens, positions, meta, rows in batches:
        hidden = None
        if not shard.first_stage:
            hidden = world.recv((1, tokens.shape[1], config.hidden_size), dtype, prev_rank)
        out = model(tokens, positions, meta, kv, hidden=hidden)
        if not shard.last_stage:
            sends.append((world.send(out, next_rank), out))
        else:
            scored.append(out[0][rows])
    for work, _ in sends:
        work.wait()
    if shard.last_stage:
        if num_rows:
            hidden = scored[0] if len(scored) == 1 else torch.cat(scored)
            logits = model.compute_logits(hidden if reorder is None else hidden[reorder])  # one lm_head
        else:  # a step of prefill chunks only: nothing to score
            logits = torch.empty(0, config.vocab_size, device=device)
        if world is None or world.rank == 0:
            return logits
        if world.rank == last_stage_head and num_rows:
            world.send(logits, 0).wait()
        return None
    if world.rank == 0:
        if not num_rows:
            return torch.empty(0, config.vocab_size, device=device)
        return world.recv((num_rows, config.vocab_size), torch.float32, last_stage_head)
    return None
