"""A cache of converted models: a quantized model is saved once after its (slow) conversion and memory-mapped on
every later load, the way llama.cpp maps its file instead of converting it.

Converting the 1.5B's GGUF blocks (unpacking Q4_K, repacking for the int4 kernel, requantizing Q6_K rows to int8)
takes seconds of arithmetic per load; the model pool reloads what it evicted, and every cold start pays it again.
The cache holds the finished module tree (`torch.save`), read back with `mmap=True`: no weight is copied until a
matmul touches its pages. Its key names everything the converted weights depend on: the checkpoint's files (path,
size, modification time), the switches that shape the weights (dtype, fusion, scheme, skip patterns, group size,
context length for the rotary tables), the torch version and CPU capability (the int4 kernel's packed layout is
torch's own), and this format's version. A file that cannot be read back is deleted and the model converted again.

It lives under `$INFER_RECIPES_CACHE/converted` (default `~/.cache/infer-recipes/converted`), about the size of the
quantized weights per variant; `INFER_RECIPES_CONVERTED_CACHE=0` turns it off. Every change of code, switches or
checkpoint is a new key, so the directory is bounded: `INFER_RECIPES_CONVERTED_CACHE_GB` (default 20) caps it, the
least recently used files go first (a load that hits marks its file used), and a write never leaves the disk with
less than 256 MiB free; what does not fit is not saved, and the load says why. The files are pickles: like any
cache of ours, the directory must be the user's own.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .. import kernels
from ..config import cache_dir, remove_stale_partials
from ..models.llama import LlamaForCausalLM

FORMAT = 1
DEFAULT_BUDGET_GB = 20.0
DISK_RESERVE = 256 << 20  # bytes a write leaves free on the disk


def _files(location: str) -> list[Path]:
    path = Path(location)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """A digest of the code that computes converted weights (loaders, quantizers, model, layers, and the kernels'
    C++, which converts GGUF blocks): a cache written by other code is never read back."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in ("loading", "quantization", "models", "layers", "kernels"):
        for file in sorted(f for f in (root / folder).rglob("*") if f.suffix in (".py", ".cpp", ".h")):
            h.update(str(file.relative_to(root)).encode() + file.read_bytes())
    return h.hexdigest()[:16]


def cache_file(source, engine_config, dtype: torch.dtype, max_positions: int, device: torch.device) -> Path | None:
    """Where this model's converted form lives, or None when it is not cached: no quantization (nothing slow to
    save), synthetic weights, a split model, a device other than the CPU, or the cache turned off."""
    cfg = engine_config
    if (not cfg.quantization or source.kind == "synthetic" or device.type != "cpu"
            or cfg.tensor_parallel_size * cfg.pipeline_parallel_size > 1
            or os.environ.get("INFER_RECIPES_CONVERTED_CACHE", "1") in ("0", "false", "no")):
        return None
    try:
        files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in _files(source.location)]
    except OSError:
        return None
    key = {"format": FORMAT, "code": _code_digest(), "files": files, "dtype": str(dtype), "fusion": cfg.fusion,
           "quantization": cfg.quantization, "skip": list(cfg.quantization_skip), "group_size": cfg.group_size,
           "max_positions": max_positions, "torch": torch.__version__,
           "native_kernels": kernels.wanted(cfg.kernels, device),
           "cpu": torch.backends.cpu.get_cpu_capability()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "converted" / f"{source.name}-{cfg.quantization}-{digest}.pt"


def load(path: Path | None) -> LlamaForCausalLM | None:
    """The cached model, memory-mapped; None on a miss. A file that cannot be read back is removed."""
    if path is None or not path.is_file():
        return None
    try:
        model = torch.load(path, mmap=True, weights_only=False)
        if not isinstance(model, LlamaForCausalLM):
            raise TypeError(f"holds a {type(model).__name__}")
        model.from_cache = True
        os.utime(path)  # used now: the least recently used files are evicted first
    except Exception as e:  # truncated, written by another version, ...: convert again
        print(f"converted-weights cache {path} is unreadable ({type(e).__name__}: {e}); converting again",
              file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
    return model.eval()


def budget() -> int:
    """The cache's cap in bytes, from INFER_RECIPES_CONVERTED_CACHE_GB (a bad value is named, and the default used)."""
    raw = os.environ.get("INFER_RECIPES_CONVERTED_CACHE_GB", "")
    try:
        gb = float(raw) if raw else DEFAULT_BUDGET_GB
        if not gb >= 0:
            raise ValueError
    except ValueError:
        print(f"INFER_RECIPES_CONVERTED_CACHE_GB={raw!r} is not a number of GB (>= 0); using {DEFAULT_BUDGET_GB:g}",
              file=sys.stderr)
        gb = DEFAULT_BUDGET_GB
    return int(gb * (1 << 30))


def model_bytes(model: torch.nn.Module) -> int:
    """About what `torch.save` writes for the model: its tensors' storages, each once."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def make_room(folder: Path, need: int, cap: int, free: int, now: float | None = None) -> str | None:
    """Evicts the least recently used files of `folder` until a file of `need` bytes fits both the cache's cap and
    the disk's `free` bytes (less the reserve); None when it fits, else why not (nothing is evicted then). A dead
    writer's half-written files go first (`remove_stale_partials`)."""
    free += remove_stale_partials(folder, now=now)
    entries = []
    for f in folder.glob("*.pt"):
        try:
            st = f.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, f))
    held = sum(size for _, size, _ in entries)
    if need > cap:
        return f"the model's {need / 2**30:.2f} GB exceed the cache's cap of {cap / 2**30:.2f} GB " \
               "(INFER_RECIPES_CONVERTED_CACHE_GB)"
    if need > free + held - DISK_RESERVE:
        return f"the disk has {free / 2**30:.2f} GB free and the model needs {need / 2**30:.2f} GB"
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if held + need <= cap and need <= free - DISK_RESERVE:
            break
        f.unlink(missing_ok=True)
        held -= size
        free += size
    return None


def save(path: Path | None, model: LlamaForCausalLM) -> None:
    """Writes the converted model (atomically: a reader never sees half a file), first evicting the least recently
    used files that stand in its way. Not saving (no room, a read-only cache) costs only the next load's
    conversion, so it is reported, not raised."""
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        why = make_room(path.parent, model_bytes(model), budget(), shutil.disk_usage(path.parent).free)
        if why:
            print(f"converted weights not cached in {path.parent}: {why}; the next load converts again",
                  file=sys.stderr)
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
        with os.fdopen(fd, "wb") as f:
            torch.save(model, f)
        os.replace(tmp, path)
    except Exception as e:
        print(f"could not save the converted weights to {path.parent} ({type(e).__name__}: {e}); the next load "
              "converts again", file=sys.stderr)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
