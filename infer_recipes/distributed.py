"""Several processes, one model: `torch.distributed` process groups started by `torchrun`, and rank 0 driving.

Launch: `torchrun --nproc-per-node N infer-recipes generate|bench|serve ...` (several nodes: torchrun's own
rendezvous). Every rank joins the world; rank 0 owns the tokenizer, the scheduler and the server, and the other
ranks only run model steps: for each step rank 0 broadcasts a command (which model, which sequences) over a gloo
control group, then every rank runs its part of the forward pass (tensor-parallel all-reduces and pipeline
sends on the backend of the device: gloo on CPU, nccl on CUDA, hccl on Ascend through `torch_npu`).

Ranks are laid out stage-major: rank = stage * tp + tp_rank, so a stage's tensor-parallel ranks are neighbours
(one node's fast links) and the pipeline crosses between groups.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from .errors import InferRecipesError
from .layers.parallel import Shard, stage_layers

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
# workers wait on the control group for the next step, however long the server idles
CONTROL_TIMEOUT = timedelta(days=30)


def world_size() -> int:
    """Ranks torchrun (or an equivalent launcher) started; 1 outside it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process is one rank of several."""
    return world_size() > 1


class ParallelContext:
    """This process's place in the world: rank, the device it drives, the control group, and the groups of
    each tensor x pipeline layout it has been asked for."""

    def __init__(self, device_type: str):
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise InferRecipesError(f"distributed runs need the launcher's environment ({', '.join(missing)} "
                                    "unset): start every rank with torchrun --nproc-per-node N ...")
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        self.backend = BACKENDS[device_type]
        if device_type == "npu":
            try:
                import torch_npu  # noqa: F401  (registers hccl)
            except ImportError:
                raise InferRecipesError("device npu needs torch_npu for the hccl backend: pip install torch_npu "
                                        "(matching your CANN and torch versions)") from None
        if not dist.is_available() or not dist.is_backend_available(self.backend):
            raise InferRecipesError(f"the {self.backend} backend (for device {device_type}) is not available in "
                                    f"this PyTorch build: install a build with it, or run on another device")
        if device_type == "cpu":
            self.device = torch.device("cpu")
            if os.environ.get("OMP_NUM_THREADS") in (None, "1"):  # torchrun's default of 1 wastes the cores
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local_world_size))
        else:
            self.device = torch.device(device_type, self.local_rank)
            getattr(torch, device_type).set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    **({"device_id": self.device} if device_type != "cpu" else {}))
        # step commands are small Python objects: always over gloo, whatever carries the tensors
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self._groups: dict[tuple[int, int], list] = {}
        self.lock = threading.RLock()  # one command at a time, whichever thread (engine, model pool) sends it
        self._pending_free: list[int] = []
        self.stopped = False
        if self.rank == 0:
            atexit.register(self.stop)

    # ---- layouts -----------------------------------------------------------------------------------------------
    def shard(self, num_layers: int, tp: int, pp: int) -> Shard:
        """This rank's Shard of a model split tp x pp ways, tp x pp = the world size (every rank calls this in the
        same order)."""
        if (tp, pp) not in self._groups:  # new_group is collective: every rank creates every group, in order
            self._groups[(tp, pp)] = [dist.new_group(list(range(s * tp, (s + 1) * tp))) if tp > 1 else None
                                      for s in range(pp)]
        stage, tp_rank = divmod(self.rank, tp)
        first, end = stage_layers(num_layers, pp, stage)
        return Shard(tp_rank=tp_rank, tp_size=tp, group=self._groups[(tp, pp)][stage], first_layer=first,
                     end_layer=end, first_stage=stage == 0, last_stage=stage == pp - 1)

    # ---- commands (rank 0 -> every rank) ----------------------------------------------------------------------
    @contextlib.contextmanager
    def command(self, *message):
        """On rank 0: sends `message` to every rank and holds the world until the caller's part of the work
        (which the other ranks run at the same time) is done."""
        with self.lock:
            if self.stopped:
                raise InferRecipesError("the distributed workers have been stopped: start a new torchrun")
            for model_id in self._pending_free:
                self._broadcast(("free", model_id))
            self._pending_free.clear()
            self._broadcast(message)
            yield

    def receive(self) -> tuple:
        """On the other ranks: the next command."""
        return self._broadcast(None)

    def _broadcast(self, message):
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def free_later(self, model_id: int) -> None:
        """A model rank 0 has dropped (called from a finalizer, any thread): the workers drop it with the next
        command."""
        self._pending_free.append(model_id)

    def stop(self) -> None:
        """On rank 0: ends the workers' loops (at exit at the latest) and leaves the world. A step that does not
        finish within a minute is abandoned: torchrun then ends the other ranks when this one exits."""
        if not self.lock.acquire(timeout=60):
            return
        try:
            if self.stopped or not dist.is_initialized():
                return
            self._broadcast(("stop",))
            self.stopped = True
            leave_world(self)
        finally:
            self.lock.release()

    # ---- tensors between ranks -------------------------------------------------------------------------------
    @staticmethod
    def send(t: torch.Tensor, dst: int):
        """Non-blocking send; the returned work must be waited for before `t` is reused."""
        return dist.isend(t.contiguous(), dst)

    def recv(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src)
        return t


_CONTEXT: ParallelContext | None = None


def leave_world(world: ParallelContext) -> None:
    """Every rank, after the stop command. A barrier first, so that no rank tears its connections down while
    another still waits on them; then every process group goes, here and now, so that each one's C++ side joins
    its worker threads (gloo's) while the process is whole, not during the interpreter's exit, where the order
    of teardown is not ours; and rank 0, which hosts torchrun's rendezvous store, keeps it until every other rank
    has left it (a store going away under connected ranks aborts processes at exit)."""
    from torch.distributed.distributed_c10d import _get_default_store

    store, rank, world_size = _get_default_store(), dist.get_rank(), dist.get_world_size()
    dist.barrier(group=world.control)
    dist.destroy_process_group()
    world.control, world._groups = None, {}
    gc.collect()  # the groups' last references (Shards of freed models) go now
    if rank != 0:
        store.add("infer_recipes/left", 1)
    else:
        import time

        deadline = time.monotonic() + 30
        while store.add("infer_recipes/left", 0) < world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.01)


def exit_process(code: int) -> NoReturn:
    """Ends a rank that only followed rank 0, once it has left the world: output flushed, then `os._exit`, so no
    library's static teardown runs after the work is done (as multiprocessing ends its children)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def context(device_type: str) -> ParallelContext:
    """The process's ParallelContext, joining the world on first use."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ParallelContext(device_type)
    elif _CONTEXT.device.type != device_type:
        raise InferRecipesError(f"this process already joined the world on {_CONTEXT.device.type}; "
                                f"it cannot also run models on {device_type}")
    return _CONTEXT


def current() -> ParallelContext | None:
    return _CONTEXT


def shutdown() -> None:
    """Stops the worker ranks (rank 0; a no-op elsewhere or when not distributed)."""
    if _CONTEXT is not None and _CONTEXT.rank == 0:
        _CONTEXT.stop()
