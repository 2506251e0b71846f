"""Our own CPU kernels, in C++ (`csrc/`): quantized linears for the few rows of a decode step, with activations
quantized to int8 per block on the fly and integer dot products (AVX-512 VNNI, or AVX2's maddubs), the way
llama.cpp reaches the memory roof; paged decode attention and the small fused operations of a decoder layer.
Each kernel is written once over a vector type (`csrc/*_impl.h`; the integer dot products once per set) and
compiled for AVX-512 and for AVX2 (decode attention over a bfloat16 pool also for AVX-512 with BF16, whose dot
products take bfloat16 pairs as they are; over an int8 pool with VNNI, integer dot products); the extension runs
the best set this CPU has (`isa()`).

The extension is built just in time, at first use, against the installed torch (`torch.utils.cpp_extension`,
gcc and ninja), and cached under `$INFER_RECIPES_CACHE/kernels/` by a key naming the sources, the torch version
and the flags, so every later process only loads it. A build marks its folder used each time it is loaded; a new
build removes all but the KEEP_BUILDS most recently used others (~2 MB each; one per source change or torch
version), except one another process is building. `native()` returns the module, or None when it cannot run
here (a CPU without AVX2, a failed build); `reason()` then says why in one line, and the callers keep
torch's kernels. The engine's `kernels` switch (native | torch) decides whether the callers ask at all.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

from ..config import cache_dir

SOURCES = ("ops.cpp", "qgemv_avx512.cpp", "attention_avx512.cpp", "attention_avx512bf16.cpp", "elementwise_avx512.cpp",
           "qgemv_avx2.cpp", "attention_avx2.cpp", "elementwise_avx2.cpp", "convert.cpp")
HEADERS = ("convert.h", "qgemv.h", "attention.h", "elementwise.h", "qgemv_impl.h", "attention_impl.h",
           "elementwise_impl.h", "vec.h", "vec8.h", "vec_math.h")
CFLAGS = ("-O3", "-std=c++17", "-fopenmp")  # OpenMP: ATen's parallel_for is a header template, serial without it
KEEP_BUILDS = 4  # other builds kept beside the one in use: a few checkouts or torch versions side by side
_why: list[str] = []


def _key() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((Path(__file__).parent / "csrc" / name).read_bytes())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {CFLAGS}".encode())
    return h.hexdigest()[:16]


def _build():
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # pip's ninja lives beside the interpreter, which may not be on PATH
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    name = f"infer_recipes_kernels_{_key()}"
    where = cache_dir() / "kernels" / name
    where.mkdir(parents=True, exist_ok=True)
    fresh = not any(where.glob(f"{name}*.so"))
    if fresh:
        print("building infer-recipes' CPU kernels (once per torch version, about a minute)...", file=sys.stderr)
    csrc = Path(__file__).parent / "csrc"
    # one build at a time, under a lock the kernel drops when its holder dies: torch's own lock file would be
    # left behind by a killed build and make every later process wait for it forever
    with open(where / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (where / "lock").unlink(missing_ok=True)
        module = cpp_extension.load(name=name, sources=[str(csrc / s) for s in SOURCES], extra_cflags=list(CFLAGS),
                                    extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=False)
        os.utime(where)  # used now: what prune() keeps
    if fresh:
        prune(where.parent, name)
    return module


def prune(folder: Path, current: str, keep: int = KEEP_BUILDS) -> list[str]:
    """Removes the builds in `folder` (infer_recipes_kernels_* directories) but `current` and the `keep` most
    recently used others; a build whose lock another process holds (being built, or loaded mid-build) is left
    alone. A loaded extension's file stays readable to the processes that have it open. Returns the names
    removed."""
    def used(d: Path) -> float:
        try:
            return d.stat().st_mtime
        except OSError:
            return float("inf")  # gone already, or not ours to judge: never picked
    others = sorted((d for d in folder.glob("infer_recipes_kernels_*") if d.is_dir() and d.name != current),
                    key=used, reverse=True)
    removed = []
    for d in others[keep:]:
        try:
            with open(d / ".build.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(d)
            removed.append(d.name)
        except OSError:  # locked by a live build, or not ours to remove
            continue
    return removed


@functools.cache
def native():
    """The built extension, or None (then `reason()` says why)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        _why.append(f"the native kernels are x86-64 Linux only (this is {sys.platform} {os.uname().machine})")
        return None
    try:
        module = _build()
    except Exception as exc:  # noqa: BLE001 -- any build failure means: run torch's kernels
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "error" in line), lines[0] if lines else type(exc).__name__)
        _why.append(f"the native kernels did not build ({first[:200]}); torch's kernels run instead")
        return None
    if not module.cpu_ok():
        _why.append("this CPU lacks AVX2 with FMA and F16C, which the native kernels need; torch's kernels run "
                    "instead")
        return None
    return module


def available() -> bool:
    return native() is not None


def isa() -> str | None:
    """The instruction set the kernels run on here: "avx512-bf16" (AVX-512 VNNI and BF16), "avx512-vnni" or "avx2"
    (None when they do not run)."""
    return native().isa() if available() else None


def wanted(switch: str, device: torch.device) -> bool:
    """Whether a model on `device` with the engine's `kernels` switch runs our kernels: asked for, on the CPU, and
    runnable here."""
    return switch == "native" and device.type == "cpu" and available()


def reason() -> str | None:
    """Why the native kernels do not run here (None when they do)."""
    native()
    return _why[0] if _why else None


# ---- the linears as torch operators, for torch.compile -------------------------------------------------------------
# Dynamo cannot trace into a pybind function; as custom operators with a shape rule the linears sit in a compiled
# graph as opaque calls. Eager calls go straight to the extension: the dispatcher's few microseconds per call,
# over hundreds of linears a decode step, are what these kernels exist to save.
@torch.library.custom_op("infer_recipes::int4_linear", mutates_args=())
def _int4_op(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, n: int,
             bias: torch.Tensor | None) -> torch.Tensor:
    return native().int4_linear(x, packed, scales_zeros, group, n, bias)


@torch.library.custom_op("infer_recipes::int8_linear", mutates_args=())
def _int8_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, n: int,
             bias: torch.Tensor | None) -> torch.Tensor:
    return native().int8_linear(x, packed, scales, n, bias)


@_int4_op.register_fake
def _(x, packed, scales_zeros, group, n, bias):
    return x.new_empty(x.shape[0], n)


@_int8_op.register_fake
def _(x, packed, scales, n, bias):
    return x.new_empty(x.shape[0], n)


def int4_linear(x, packed, scales_zeros, group: int, n: int, bias=None) -> torch.Tensor:
    """y = x W^T (+ bias) for an int4 W in the native layout (`layout.pack_int4`); x is [M, K]."""
    if torch.compiler.is_compiling():
        return _int4_op(x, packed, scales_zeros, group, n, bias)
    return native().int4_linear(x, packed, scales_zeros, group, n, bias)


def int8_linear(x, packed, scales, n: int, bias=None) -> torch.Tensor:
    """y = x W^T (+ bias) for an int8 W in the native layout (`layout.pack_int8`); x is [M, K]."""
    if torch.compiler.is_compiling():
        return _int8_op(x, packed, scales, n, bias)
    return native().int8_linear(x, packed, scales, n, bias)
