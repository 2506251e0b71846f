"""Each quantized matmul against a float reference, within the error its format and kernel allow."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from infer_recipes import kernels
from infer_recipes.quantization.gguf import dequantize, dequantize_rows, int4_parts, int8_parts
from infer_recipes.quantization.int4 import Int4Linear
from infer_recipes.quantization.int8 import Int8Linear, Int8MinMaxLinear
from infer_recipes.quantization.w8a8 import W8A8Linear, quantize_per_token

BF16_EPS = 2.0 ** -8  # relative rounding of a bfloat16 value


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 256, generator=g) * 0.05
    w[3] *= 20  # one loud channel: per-channel scales must keep the others precise
    x = torch.randn(7, 256, generator=g)
    return w, x


def _bound(x, w, weight_err):
    """|x| |dW| (weight rounding) + bfloat16 rounding of the activations and of the output."""
    ax, aw = x.abs(), w.abs()
    return ax @ weight_err.t() + 2 * BF16_EPS * (ax @ aw.t()) + 1e-5


@pytest.mark.parametrize("cls", [Int8Linear, Int8MinMaxLinear])
def test_int8_weight_only(data, cls):
    w, x = data
    layer = cls(w)
    deq = layer.dequantize()
    # round-to-nearest: at most half a step per weight, the step being per output channel
    step = layer.scales.float()  # the scale the kernel holds, rounded up from range / levels
    ideal = (w.abs().amax(1) / 127) if cls is Int8Linear else (w.amax(1) - w.amin(1)) / 255
    assert ((step >= ideal) & (step <= ideal * (1 + 2 * BF16_EPS))).all()  # one bf16 spacing
    assert ((deq - w).abs() <= step[:, None] / 2 + 1e-6).all()
    err = (layer(x) - x @ w.t()).abs()
    assert (err <= _bound(x, w, step[:, None].expand_as(w) / 2 * 1.01)).all()
    assert layer.qweight.dtype == torch.int8


def test_w8a8(data):
    w, x = data
    layer = W8A8Linear(w)
    xq, xs = quantize_per_token(x)
    assert ((xq.float() * xs - x).abs() <= xs / 2 + 1e-7).all()
    wstep = w.abs().amax(1) / 127
    err = (layer(x) - x @ w.t()).abs()
    # weight rounding plus activation rounding (half a step of each token's scale on every element)
    bound = x.abs() @ (wstep[:, None] / 2).expand_as(w).t() + (xs / 2) @ w.abs().sum(1, keepdim=True).t() + 1e-4
    assert (err <= bound).all()
    # the integer part is exact: int32 accumulation of int8 products
    acc = torch._int_mm(xq, layer.qweight_t.t())
    assert torch.equal(acc, (xq.long() @ layer.qweight_t.long().t()).int())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_group_wise(data, group):
    w, x = data
    layer = Int4Linear.from_float(w, None, group)
    wg = w.view(w.shape[0], -1, group)
    step = ((wg.amax(-1) - wg.amin(-1)) / 15).repeat_interleave(group, dim=1) * (1 + 2 * BF16_EPS)  # [N, K]
    deq = layer.dequantize()
    # half a step per weight; the zero's bfloat16 rounding may push the group's edge values up to one more
    # rounding of |zero|; the dequantized read-back is itself rounded to bfloat16
    weight_err = step / 2 + BF16_EPS * (w.abs() + 8 * step + wg.abs().amax(-1).repeat_interleave(group, 1))
    assert ((deq - w).abs() <= weight_err + BF16_EPS * w.abs()).all()
    err = (layer(x) - x @ w.t()).abs()
    assert (err <= _bound(x, w, weight_err)).all()
    assert layer.weight_bytes() < w.numel()  # well under a byte per weight


def _gguf_blocks(qtype, w: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """Blocks of `qtype` for a [rows, cols] tensor: `gguf`'s own quantizer where it has one; for the K-quants
    (which it can only dequantize) random bytes with sane float16 super-block scales, which are valid blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    kind = GGMLQuantizationType[qtype]
    if qtype not in ("Q4_K", "Q6_K"):
        return gguf_quantize(w, kind)
    elements, nbytes = GGML_QUANT_SIZES[kind]
    rows, cols = w.shape
    raw = g.integers(0, 256, (rows, cols // elements, nbytes), dtype=np.uint8)
    scales = (g.random((rows, cols // elements, 2)) * 0.004 + 0.0005).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        raw[..., 0:4] = scales.reshape(rows, -1, 4)  # d, dmin
    else:
        raw[..., nbytes - 2:] = scales[..., :2]  # d closes a Q6_K block
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_4bit_blocks_map_exactly_onto_the_int4_kernel(qtype):
    """The block values themselves map exactly (W = (q - 8) * scale + zero per 32); the kernel then holds scale
    and zero in bfloat16, within that rounding."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    g = np.random.default_rng(1)
    w = (g.standard_normal((64, 512)) * 0.1).astype(np.float32)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    blocks = _gguf_blocks(qtype, w, g)
    ref = torch.from_numpy(gguf_dequantize(blocks, GGMLQuantizationType[qtype])).reshape(64, 512)
    q, d, zeros = int4_parts(qtype, blocks, 64, 512)
    exact = ((q.view(64, -1, 32).float() - 8) * d[..., None] + zeros[..., None]).view(64, 512)
    assert torch.allclose(exact, ref, atol=1e-6, rtol=0)
    layer = Int4Linear(q, d, zeros, 32)
    err = (layer(x) - x @ ref.t()).abs()
    held = BF16_EPS * (zeros.abs() + 8 * d.abs()).repeat_interleave(32, 1)  # the bf16 rounding of each group
    assert (err <= _bound(x, ref, BF16_EPS * ref.abs() + held)).all()


@pytest.mark.parametrize("qtype", ["Q5_0", "Q8_0", "Q6_K", "Q4_K"])
def test_gguf_blocks_onto_int8_rows_within_half_a_step(qtype):
    """Wider types (and 4-bit ones inside a fused module with wider parts) become int8 per row: each weight
    within half an 8-bit step of its row's range of what `gguf` dequantizes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    g = np.random.default_rng(2)
    w = (g.standard_normal((40, 512)) * 0.05).astype(np.float32)
    blocks = _gguf_blocks(qtype, w, g)
    ref = torch.from_numpy(gguf_dequantize(blocks, GGMLQuantizationType[qtype])).reshape(40, 512)
    q, s = int8_parts(qtype, blocks, 40, 512)
    assert q.dtype == torch.int8 and s.shape == (40,)
    step = ref.abs().amax(dim=1, keepdim=True) / 127
    assert ((q.float() * s[:, None] - ref).abs() <= step * 0.5 * (1 + 2 * BF16_EPS) + 1e-7).all()


@pytest.mark.skipif(not kernels.available(), reason=f"{kernels.reason()}")
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q8_0", "Q6_K"])
def test_native_gguf_conversion_gives_the_values_of_the_reference(qtype):
    """The extension converts blocks at load; numpy/torch's conversion is its reference: the same values, exactly
    (odd row counts: the threads' row ranges; a few rows at a huge scale, one at zero)."""
    g = np.random.default_rng(4)
    w = (g.standard_normal((37, 512)) * 0.05).astype(np.float32)
    w[3] *= 1000
    w[5] = 0
    blocks = _gguf_blocks(qtype, w, g)
    blocks.flags.writeable = False  # as the mapped file's pages are
    pairs = [(int8_parts(qtype, blocks, 37, 512, native=True), int8_parts(qtype, blocks, 37, 512)),
             ([dequantize(qtype, torch.from_numpy(blocks), 512, native=True)], [dequantize_rows(qtype, blocks, 512)])]
    if qtype == "Q4_K":  # on its own: the int4 form; in a fused module with wider parts: int8 rows
        pairs.append((int4_parts(qtype, blocks, 37, 512, native=True), int4_parts(qtype, blocks, 37, 512)))
    for got, want in pairs:
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.skipif(not kernels.available(), reason=f"{kernels.reason()}")
@pytest.mark.parametrize("parts", [[("Q4_K", 32), ("Q4_K", 21)], [("Q4_K", 16), ("Q6_K", 37)], [("Q8_0", 19)],
                                   [("Q5_0", 32), ("Q5_0", 16), ("Q6_K", 5)], [("Q4_K", 20), ("Q4_K", 16)]])
def test_gguf_linears_packed_straight_from_the_blocks_hold_what_packing_their_values_holds(parts):
    """GGUF linears are packed into the native layouts straight from the blocks, part by part (tiles of 16 rows
    concatenate; a part that ends inside a tile, not the last, takes the path through [N, K] values): the same
    bytes as packing the values the reference conversion gives."""
    from infer_recipes.quantization.api import gguf_linear

    g = np.random.default_rng(5)
    found = [(t, _gguf_blocks(t, (g.standard_normal((n, 512)) * 0.05).astype(np.float32), g)) for t, n in parts]
    bias = torch.randn(sum(n for _, n in parts))
    got, kind = gguf_linear(found, 512, bias, native=True)
    n = got.out_features
    if kind == "int4":
        values = [int4_parts(t, b, b.shape[0], 512) for t, b in found]
        want = Int4Linear(*(torch.cat([v[i] for v in values]) for i in range(3)), 32, bias, native=True)
    else:
        values = [int8_parts(t, b, b.shape[0], 512) for t, b in found]
        want = Int8Linear.from_parts(torch.cat([v[0] for v in values]), torch.cat([v[1] for v in values]), bias,
                                     native=True)
    assert kind == ("int4" if {t for t, _ in parts} == {"Q4_K"} else "int8") and n == bias.numel()
    mine, theirs = dict(got.named_buffers()), dict(want.named_buffers())
    assert mine.keys() == theirs.keys()
    for name, buf in theirs.items():
        assert mine[name].dtype == buf.dtype and torch.equal(mine[name], buf), name


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_1"])
def test_a_table_left_in_its_gguf_blocks_looks_up_the_rows_the_file_holds(qtype, native):
    from infer_recipes.quantization.embedding import GGUFEmbedding

    if native and not kernels.available():
        pytest.skip(kernels.reason())
    g = np.random.default_rng(6)
    blocks = _gguf_blocks(qtype, (g.standard_normal((50, 256)) * 0.05).astype(np.float32), g)
    blocks.flags.writeable = False  # as the mapped file's pages are
    table = GGUFEmbedding(qtype, blocks, 256, torch.bfloat16, native)
    assert table.blocks.data_ptr() == blocks.ctypes.data  # the file's bytes, not a copy
    ids = torch.tensor([[3, 49, 0], [3, 7, 7]])
    rows = table(ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (2, 3, 256)
    assert torch.equal(rows, dequantize_rows(qtype, blocks, 256)[ids].to(torch.bfloat16))


def test_a_fused_module_of_mixed_gguf_types_becomes_int8():
    from infer_recipes.quantization.api import gguf_linear
    from infer_recipes.quantization.int8 import Int8Linear

    g = np.random.default_rng(3)
    parts = [(t, _gguf_blocks(t, (g.standard_normal((32, 256)) * 0.05).astype(np.float32), g))
             for t in ("Q4_K", "Q4_K", "Q6_K")]
    linear, kernel = gguf_linear(parts, 256, None)
    assert kernel == "int8" and isinstance(linear, Int8Linear) and linear.out_features == 96
    same, kernel = gguf_linear(parts[:2], 256, None)
    assert kernel == "int4" and isinstance(same, Int4Linear)


def test_int4_w8a8_picks_the_kernel_by_phase(data):
    """Decode-sized calls (<= 4 rows) go through int4, prefill-sized ones through w8a8: each exactly as alone."""
    from infer_recipes.quantization.w8a8 import PhaseLinear

    w, x = data
    small, large = Int4Linear.from_float(w), W8A8Linear(w)
    layer = PhaseLinear(small, large)
    for rows in (1, 4):
        assert torch.equal(layer(x[:rows]), small(x[:rows]))
    assert torch.equal(layer(x), large(x))  # 7 rows
    assert not torch.equal(small(x), large(x))  # the two forms really differ, so the checks above can fail


def test_big_matrices_quantize_in_slices_exactly_as_whole():
    from infer_recipes.quantization import base

    g = torch.Generator().manual_seed(1)
    w = torch.randn(320, 64, generator=g)
    whole = Int8Linear.quantize(w)
    rows, base.ROWS_PER_CHUNK = base.ROWS_PER_CHUNK, 128  # 320 rows in slices of 128, 128, 64 (int4 packs 16 rows at a time)
    try:
        sliced = Int8Linear.quantize(w)
        a = Int4Linear.from_float(w)
    finally:
        base.ROWS_PER_CHUNK = rows
    b = Int4Linear.from_float(w)
    assert all(torch.equal(p, q) for p, q in zip(whole, sliced))
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales_zeros, b.scales_zeros)
