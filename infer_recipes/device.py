"""Backend detection (cpu, cuda, npu through torch_npu), synchronization and memory statistics."""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import resource
import sys
import threading

import torch

from .errors import InferRecipesError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers the "npu" device with torch)

    return hasattr(torch, "npu") and torch.npu.is_available()


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then npu, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _npu_available():
            return torch.device("npu")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InferRecipesError(
                f"device {name!r} is not available: this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                "use --device cpu (or auto)")
        return torch.device(name)
    if kind == "npu":
        if not _npu_available():
            raise InferRecipesError(
                f"device {name!r} is not available: torch_npu is not installed or sees no Ascend NPU; "
                "use --device cpu (or auto)")
        return torch.device(name)
    raise InferRecipesError(f"unknown device {name!r}: choose auto, cpu, cuda or npu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in _DTYPES:
        raise InferRecipesError(f"unknown dtype {name!r}: choose float32, bfloat16 or float16")
    dtype = _DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise InferRecipesError(f"{torch.cuda.get_device_name(device)} does not support bfloat16: use float16")
    return dtype


def half_dtypes(device: torch.device) -> tuple[str, ...]:
    """The 16-bit activation dtypes this device computes in hardware: a GPU's, and bfloat16 on a CPU with
    AVX512-BF16 or AMX (elsewhere torch emulates it, slower than float32)."""
    if device.type == "cuda":
        return ("bfloat16", "float16") if torch.cuda.is_bf16_supported() else ("float16",)
    if device.type == "npu":
        return ("bfloat16", "float16")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return ("bfloat16",) if {"avx512_bf16", "amx_bf16"} & set(flags) else ()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3


def trim_host_memory() -> None:
    """Hands freed heap pages back to the OS (glibc's malloc_trim); elsewhere this does nothing."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_memory() -> None:
    """After a model is dropped: its cycles collected now, and on a GPU the cached blocks handed back, so the next
    model loads into memory that is free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def returning_host_memory():
    """While loading: large temporaries (dequantized and float weights) get their own mappings, so freeing them
    really frees them and they never pile up in the heap (glibc otherwise raises its mmap threshold after the
    first big free, and the heap keeps every later temporary: hundreds of MB of peak for a 135M model). After:
    the threshold glibc would have reached anyway (32 MB), so steady-state inference reuses heap memory."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            libc.malloc_trim(0)


def current_rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_memory_bytes(torch.device("cpu"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device (host RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "npu":
        return torch.npu.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class PeakMemory:
    """Peak memory over a `with` block: the resident set sampled every `interval` s on the CPU (the whole process),
    the allocator's peak on CUDA / NPU (reset on entry)."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type in ("cuda", "npu"):
            getattr(torch, self.device.type).reset_peak_memory_stats(self.device)
        else:
            self.peak = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_bytes())

    def __exit__(self, *exc):
        if self.device.type in ("cuda", "npu"):
            self.peak = getattr(torch, self.device.type).max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss_bytes())
