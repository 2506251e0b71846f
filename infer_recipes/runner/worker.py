"""A rank other than 0 of a split model: it builds the runners rank 0 builds, for its own shard, and runs their
steps as rank 0 sends them, until rank 0 stops the workers; then the process ends."""
from __future__ import annotations

import gc
from typing import NoReturn

from .. import distributed
from ..device import returning_host_memory
from .build import build, prepare
from .model_runner import ModelRunner


def run_worker(world: distributed.ParallelContext) -> NoReturn:
    runners: dict[int, ModelRunner] = {}
    while True:
        message = world.receive()
        if message[0] == "load":
            _, model_id, spec, cfg, num_blocks = message
            with returning_host_memory():
                bp = prepare(spec, cfg, world.device)
                shard = world.shard(bp.model_config.num_layers, cfg.tensor_parallel_size,
                                    cfg.pipeline_parallel_size)
                runners[model_id] = build(bp, num_blocks, shard, world, model_id, progress=False)
        elif message[0] == "run":
            _, model_id, kind, payload = message
            runners[model_id].run(kind, payload)
        elif message[0] == "free":
            runners.pop(message[1], None)
            gc.collect()
        elif message[0] == "stop":
            runners.clear()  # their process groups go with them, now, not at interpreter exit
            gc.collect()
            distributed.leave_world(world)
            distributed.exit_process(0)
