"""`quantize(model, scheme, skip=...)`: swap the model's nn.Linear layers for quantized ones, in place."""
from __future__ import annotations

import fnmatch
import sys
from collections import Counter

import torch
from torch import nn
from tqdm import tqdm

from ..config import GROUP_SIZES
from ..errors import InferRecipesError
from ..kernels import layout
from . import gguf as gguf_q
from .embedding import GGUFEmbedding, Int8Embedding
from .int4 import Int4Linear
from .int8 import Int8Linear, Int8MinMaxLinear
from .w8a8 import PhaseLinear, W8A8Linear

# bytes a weight costs in each scheme, its scales and zero points included (int8: a bf16 scale per output row of
# ~4096 inputs; int4 and GGUF Q4: a bf16 scale and zero per group of 32; int4-w8a8 holds both forms); the
# planner and the model pool's memory budget read this one table
BYTES_PER_WEIGHT = {"int8": 1.0 + 2 / 4096, "int8-minmax": 1.0 + 6 / 4096, "w8a8": 1.0 + 4 / 4096,
                    "int4": 0.5 + 4 / 32, "gguf": 0.5 + 4 / 32, "int4-w8a8": 0.5 + 4 / 32 + 1.0 + 4 / 4096}

# (weight, bias, group size, native kernels) -> module
SCHEMES = {
    "int8": lambda w, b, g, n: Int8Linear(w, b, n),
    "int8-minmax": lambda w, b, g, n: Int8MinMaxLinear(w, b),
    "w8a8": lambda w, b, g, n: W8A8Linear(w, b),
    "int4": lambda w, b, g, n: Int4Linear.from_float(w, b, g, n),
    "int4-w8a8": lambda w, b, g, n: PhaseLinear(Int4Linear.from_float(w, b, g, n), W8A8Linear(w, b)),
}


def skipped(name: str, patterns) -> bool:
    """Module-name patterns kept in float: fnmatch globs (`lm_head`, `model.layers.0.*`) or plain prefixes."""
    return any(fnmatch.fnmatch(name, p) or name == p or name.startswith(p + ".") for p in patterns)


def _linear_targets(model: nn.Module, skip, root: str = "") -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules under `root` (full names) not skipped; refuses devices the CPU kernels cannot serve.

    The device is read from the targets themselves: while a model loads unit by unit the rest of it is still on
    the meta device (a weight kept in GGUF blocks never leaves it)."""
    base = model.get_submodule(root) if root else model
    names = ((f"{root}.{n}" if root and n else root or n, m) for n, m in base.named_modules())
    targets = [(n, m) for n, m in names if isinstance(m, nn.Linear) and not skipped(n, skip)]
    devices = {t.device.type for _, m in targets for t in (m.weight, m.bias) if t is not None} - {"meta"}
    if devices - {"cpu"}:
        raise InferRecipesError(f"quantization runs through PyTorch's CPU kernels; on {', '.join(sorted(devices))} "
                                "it is not implemented yet: use --device cpu or no quantization")
    return targets


def check_scheme(scheme: str, group_size: int = 32) -> None:
    if scheme not in SCHEMES:
        raise InferRecipesError(f"unknown quantization {scheme!r}: choose one of {', '.join(SCHEMES)} (or gguf)")
    if scheme.startswith("int4") and group_size not in GROUP_SIZES:
        raise InferRecipesError(f"group_size {group_size} is not supported: choose one of {GROUP_SIZES}")


def quantize(model: nn.Module, scheme: str, skip=(), group_size: int = 32, progress: bool = True,
             root: str = "", native: bool = False) -> nn.Module:
    """Quantizes the Linear layers under `root` (the whole model by default) in place. Loading calls it layer by
    layer as layers arrive, so the whole model never sits in float. `native`: our own CPU kernels where they run
    (see `infer_recipes.kernels`), else torch's."""
    check_scheme(scheme, group_size)
    targets = _linear_targets(model, skip, root)
    for name, module in tqdm(targets, desc=f"quantizing ({scheme})", unit="linear", disable=not progress,
                             file=sys.stderr, leave=False):
        if scheme.startswith("int4") and module.in_features % group_size:
            continue  # an odd shape stays in float rather than failing the whole model
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            q = SCHEMES[scheme](module.weight.detach(), module.bias, group_size, native)
        setattr(parent, leaf, q)
    return model


EMBEDDING = "model.embed_tokens"


def quantize_embedding(model: nn.Module, skip=()) -> bool:
    """Replaces the float embedding table with an int8 one (sharing a tied int8 lm_head's weight when there is
    one). Returns whether it did; `model.embed_tokens` in the skip patterns keeps it float."""
    emb = model.get_submodule(EMBEDDING)
    if not isinstance(emb, nn.Embedding) or skipped(EMBEDDING, skip) or emb.weight.device.type != "cpu":
        return False
    head = getattr(model, "lm_head", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and type(head) is nn.Linear:
        return False  # the head stays float (skipped): it needs the float table anyway
    if tied and type(head) is Int8Linear:
        table = Int8Embedding.sharing(head, emb.weight.dtype)
    else:
        table = Int8Embedding.from_float(emb.weight.detach())
    model.model.embed_tokens = table
    return True


# fused modules are built from these checkpoint tensors, in this order
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


FUSED_INTO = {part: fused for fused, parts in MERGED.items() for part in parts}


def gguf_module(param_name: str, fusion: bool) -> str:
    """The module a checkpoint weight ends up in: its fused module when fusion is on (gguf_sources' inverse)."""
    parent, _, leaf = param_name.removesuffix(".weight").rpartition(".")
    leaf = FUSED_INTO.get(leaf, leaf) if fusion else leaf
    return f"{parent}.{leaf}" if parent else leaf


def gguf_sources(module_name: str) -> list[str]:
    """The checkpoint tensors a (possibly fused) Linear is built from."""
    parent, _, leaf = module_name.rpartition(".")
    return [f"{parent}.{p}.weight" if parent else f"{p}.weight" for p in MERGED.get(leaf, (leaf,))]


def gguf_linear(found: list[tuple[str, object]], in_features: int, bias, native: bool = False
                ) -> tuple[nn.Module, str]:
    """One Linear from the GGUF blocks of its parts: int4 when every part is a 4-bit type, else int8 per row."""
    kinds = {gguf_q.kernel_for(qtype) for qtype, _ in found}
    native_form = _gguf_native(found, in_features, bias, kinds, native)
    if native_form is not None:
        return native_form
    if kinds == {"int4"}:
        parts = [gguf_q.int4_parts(qtype, blocks, blocks.shape[0], in_features, native) for qtype, blocks in found]
        q, scales, zeros = (torch.cat([p[i] for p in parts]) for i in range(3))
        return Int4Linear(q, scales, zeros, 32, bias, native), "int4"
    parts = [gguf_q.int8_parts(qtype, blocks, blocks.shape[0], in_features, native) for qtype, blocks in found]
    return Int8Linear.from_parts(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), bias,
                                 native), "int8"


def _gguf_native(found, in_features: int, bias, kinds: set, native: bool) -> tuple[nn.Module, str] | None:
    """gguf_linear straight from the blocks into the native kernels' layouts, where the extension converts every
    part's type and the parts' tiles of 16 rows concatenate (all but the last part whole tiles)."""
    if not native or any(blocks.shape[0] % layout.TILE for _, blocks in found[:-1]):
        return None
    rows = sum(blocks.shape[0] for _, blocks in found)
    if kinds == {"int4"}:
        parts = [gguf_q.int4_packed(qtype, blocks, blocks.shape[0], in_features, native) for qtype, blocks in found]
        if any(p is None for p in parts):
            return None
        packed, sz = (_joined([p[i] for p in parts]) for i in range(2))
        return Int4Linear.from_native(packed, sz, rows, in_features, 32, bias), "int4"
    if in_features % 32:  # the native int8 kernel's block
        return None
    parts = [gguf_q.int8_packed(qtype, blocks, blocks.shape[0], in_features, native) for qtype, blocks in found]
    if any(p is None for p in parts):
        return None
    packed, scales = (_joined([p[i] for p in parts]) for i in range(2))
    return Int8Linear.from_native(packed, scales, rows, in_features, bias), "int8"


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def quantize_gguf(model: nn.Module, blocks_for, skip=(), progress: bool = True, root: str = "",
                  native: bool = False) -> Counter:
    """Keeps a GGUF file's quantized blocks quantized: each Linear whose checkpoint tensors are all quantized
    types becomes an Int4Linear (Q4_0, Q4_1, Q4_K: group 32, exact) or an Int8Linear (other types, or a fused
    module whose parts mix 4-bit and wider types), built from the blocks without a float copy of the tensor.
    Linears with float tensors stay float.

    blocks_for(param_name) -> (type name, uint8 blocks [N, bytes]) | None. Returns a count per
    (GGUF type, kernel) of the checkpoint tensors replaced."""
    targets = _linear_targets(model, skip, root)
    report: Counter = Counter()
    for name, module in tqdm(targets, desc="keeping GGUF blocks", unit="linear", disable=not progress,
                             file=sys.stderr, leave=False):
        found = [blocks_for(s) for s in gguf_sources(name)]
        if any(f is None or gguf_q.kernel_for(f[0]) is None for f in found):
            continue
        parent_name, _, leaf = name.rpartition(".")
        with torch.no_grad():
            linear, kernel = gguf_linear(found, module.in_features, module.bias, native)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
        report.update((qtype, kernel) for qtype, _ in found)
    return report


def quantize_codes(model: nn.Module, codes_for, group_size: int, skip=(), root: str = "", native: bool = False
                   ) -> int:
    """Int4Linears built from saved codes (a GPTQ checkpoint's), for every Linear under `root` whose checkpoint
    parts all have them; the others are left for `quantize`. codes_for(checkpoint linear name) -> (packed codes
    [N, K / 2], scales, zeros [N, K / group]) | None. Returns how many Linears it built."""
    from .gptq import unpack

    built = 0
    for name, module in _linear_targets(model, skip, root):
        parts = [codes_for(s.removesuffix(".weight")) for s in gguf_sources(name)]
        if any(p is None for p in parts):
            continue
        q = torch.cat([unpack(p[0]) for p in parts])
        scales, zeros = (torch.cat([p[i].float() for p in parts]) for i in (1, 2))
        groups = (module.out_features, module.in_features // group_size)
        if q.shape != (module.out_features, module.in_features) or scales.shape != groups or zeros.shape != groups:
            raise InferRecipesError(f"the saved int4 codes of {name} have shape {tuple(q.shape)}, the model's "
                                    f"weight {(module.out_features, module.in_features)}: the checkpoint is "
                                    "corrupt; write it again with `infer-recipes quantize`")
        parent_name, _, leaf = name.rpartition(".")
        with torch.no_grad():
            linear = Int4Linear(q, scales, zeros, group_size, module.bias, native)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
        built += 1
    return built


def gguf_embedding(model: nn.Module, blocks, dtype: torch.dtype, native: bool = False) -> bool:
    """The embedding table left in its GGUF blocks (any quantized type), rows dequantized as they are looked up.
    Returns whether it did (a float table in the file stays float)."""
    if blocks is None or gguf_q.kernel_for(blocks[0]) is None:
        return False
    emb = model.get_submodule(EMBEDDING)
    model.model.embed_tokens = GGUFEmbedding(blocks[0], blocks[1], emb.embedding_dim, dtype, native)
    return True
