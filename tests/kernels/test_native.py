"""Our C++ kernels against torch references: the layouts round-trip exactly; the kernels compute what int8
activations per block against the packed weights stand for, to float rounding; the engine on them agrees with
torch's kernels on real models; `kernels: torch` keeps torch's path."""
from __future__ import annotations

import pytest
import torch

from infer_recipes import kernels
from infer_recipes.kernels import layout
from infer_recipes.quantization.embedding import Int8Embedding
from infer_recipes.quantization.int4 import Int4Linear
from infer_recipes.quantization.int8 import Int8Linear
from tests.conftest import count_decode_layer_calls, data_path, qwen_gguf, smollm2_gguf

needs_native = pytest.mark.skipif(not kernels.available(), reason=f"{kernels.reason()}")
ISAS = kernels.native().isas() if kernels.available() else []


def _use(name):
    if name is None:
        pytest.skip(kernels.reason())
    kernels.native().use_isa(name)
    assert kernels.isa() == name
    yield name
    kernels.native().use_isa(ISAS[0])


@pytest.fixture(params=[i for i in ISAS if i != "avx512-bf16"] or [None])
def isa(request):
    """Each instruction set this CPU runs kernels for (an AVX-512 machine tests its AVX2 kernels too); avx512-bf16
    runs avx512-vnni's kernels except decode attention, which `attention_isa` tests."""
    yield from _use(request.param)


@pytest.fixture(params=ISAS or [None])
def attention_isa(request):
    """Every instruction set, avx512-bf16 (its own decode attention) included."""
    yield from _use(request.param)


def _quantized_activations(x: torch.Tensor, block: int):
    """What the kernels do to activations: per block of `block`, d = max|x| / 127, xq = round(x / d) (ties to
    even), and the exact float sum of each block. Returns (x as the kernel sees it, block sums)."""
    M, K = x.shape
    xb = x.float().view(M, K // block, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(d > 0, torch.round(xb * torch.where(d > 0, 1 / d, 0)), 0).clamp(-127, 127)
    return (xq * d).view(M, K).double(), xb.sum(-1).double()


def _int4_reference(x, q, s, z, group):
    """x W^T with W = (q - 8) s + z, activations as the kernel quantizes them (zeros take the exact sums)."""
    N, K = q.shape
    xh, sums = _quantized_activations(x, group)
    w = ((q.double().view(N, K // group, group) - 8) * s.double()[..., None]).view(N, K)
    return xh @ w.t() + sums @ z.double().t()


SHAPES = [(37, 64), (100, 256), (16, 384), (33, 576), (129, 1536)]


@needs_native
@pytest.mark.parametrize("N,K", SHAPES)
def test_native_packing_writes_the_bytes_of_the_torch_reference(N, K):
    """The extension packs at load (convert.cpp); the torch permutes are its reference, padded last tile included."""
    g = torch.Generator().manual_seed(N * K)
    for group in (32, 64, 128):
        if K % group:
            continue
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
        s, z = torch.rand(N, K // group, generator=g) * 0.02, torch.randn(N, K // group, generator=g) * 0.05
        for got, want in zip(layout.pack_int4(q, s, z, group), layout.pack_int4_reference(q, s, z, group)):
            assert got.dtype == want.dtype and torch.equal(got, want)
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s8 = torch.rand(N, generator=g)
    for got, want in zip(layout.pack_int8(q8, s8), layout.pack_int8_reference(q8, s8)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@needs_native
@pytest.mark.parametrize("N,K,group", [(n, k, g) for n, k in SHAPES for g in (32, 64, 128) if k % g == 0])
def test_int4_kernel_matches_its_math(N, K, group, isa):
    """Odd row counts (a padded last tile), every group size, M = 1..16 (every register-blocking remainder),
    float32 and bfloat16 activations, with a bias."""
    g = torch.Generator().manual_seed(N * K + group)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // group, generator=g) * 0.02 + 1e-3
    z = torch.randn(N, K // group, generator=g) * 0.05
    packed, sz = layout.pack_int4(q, s, z, group)
    q2, s2, z2 = layout.unpack_int4(packed, sz, N, K, group)
    assert torch.equal(q2, q)
    assert torch.allclose(s2, s, rtol=1e-3) and torch.allclose(z2, z, rtol=1e-3, atol=1e-7)  # float16 scales
    bias = torch.randn(N, generator=g)
    for M in (1, 2, 3, 5, 6, 7, 11, 16, 19):
        x = torch.randn(M, K, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            ref = _int4_reference(xd, q2, s2, z2, group) + bias.double()
            y = kernels.native().int4_linear(xd.contiguous(), packed, sz, group, N, bias)
            assert y.dtype == dtype and y.shape == (M, N)
            tol = (1e-5 if dtype == torch.float32 else 8e-3) * ref.abs().max().item()  # bf16 output: 8 bits
            assert (y.double() - ref).abs().max().item() <= tol


@needs_native
@pytest.mark.parametrize("N,K", SHAPES)
def test_int8_kernel_matches_its_math(N, K, isa):
    g = torch.Generator().manual_seed(N + K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.01 + 1e-4
    packed, s_padded = layout.pack_int8(q, s)
    assert torch.equal(layout.int8_rows(packed, N, K), q)
    ids = torch.tensor([N - 1, 0, N // 2, N - 1])
    assert torch.equal(layout.int8_rows(packed, N, K, ids), q[ids])
    bias = torch.randn(N, generator=g)
    for M in (1, 4, 6, 9, 16, 19):
        x = torch.randn(M, K, generator=g) * 3
        ref = _quantized_activations(x, 32)[0] @ (q.double() * s.double()[:, None]).t() + bias.double()
        y = kernels.native().int8_linear(x, packed, s_padded, N, bias)
        assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@needs_native
@pytest.mark.parametrize("cls", ["int4", "int8"])
def test_native_linear_stands_for_the_same_weight_as_torch(cls, isa):
    """A module on our kernel dequantizes to the weight torch's form holds (up to their scales' float16 against
    bfloat16 rounding) and its output is within the int8-activation error of the float product."""
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(208, 512, generator=g) * 0.05, torch.randn(208, generator=g)  # torch wants N % 16 == 0
    make = (lambda n: Int4Linear.from_float(w, b, 64, native=n)) if cls == "int4" else (
        lambda n: Int8Linear(w, b, native=n))
    ours, theirs = make(True), make(False)
    assert ours.native and not theirs.native
    assert torch.allclose(ours.dequantize(), theirs.dequantize(), rtol=1e-2, atol=1e-4)
    x = torch.randn(5, 3, 512, generator=g)
    exact = x @ ours.dequantize().t() + b
    err = (ours(x) - exact).abs().max().item()
    assert err <= 0.01 * exact.abs().max().item()  # int8 activations: ~1/254 of each block's range per element


@needs_native
def test_a_tied_table_reads_the_native_head_rows():
    g = torch.Generator().manual_seed(3)
    head = Int8Linear(torch.randn(70, 96, generator=g), native=True)
    table = Int8Embedding.sharing(head, torch.float32)
    ids = torch.tensor([[69, 0, 17], [5, 5, 68]])
    assert torch.allclose(table(ids), head.dequantize()[ids])
    assert not list(table.buffers())  # no copy of the head's weight


def _greedy_agreement(ours, reference, prompts, tokens: int) -> float:
    """The share of our greedy tokens that are the reference's argmax after the same prefix (decode steps)."""
    from infer_recipes.config import SamplingParams

    agree = total = 0
    for out in ours.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)):
        ids = out.prompt_token_ids + out.token_ids
        picks = reference.logits(ids).argmax(-1)[len(out.prompt_token_ids) - 1:-1].tolist()
        agree += sum(a == b for a, b in zip(picks, out.token_ids))
        total += len(out.token_ids)
    return agree / total


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at",
           "import numpy as np\n", "Translate to French: cheese"]


@needs_native
@pytest.mark.parametrize("model,scheme", [("smollm2-135m-instruct", "int4"), ("smollm2-135m-instruct", "int8"),
                                          ("qwen2.5-coder-0.5b-instruct", "gguf")])
def test_engine_on_native_kernels_agrees_with_torch_kernels(model, scheme):
    """int8 activations change results the way llama.cpp's do; measured here (README): SmolLM2 int4 96 % top-1
    on WikiText-2 and 125 / 128 greedy tokens, Qwen2.5-Coder-0.5B gguf 98 % and 127 / 128."""
    from infer_recipes import LLM
    from infer_recipes.eval.perplexity import agreement

    smollm2_gguf() if model.startswith("smollm2") else qwen_gguf(model)
    ours = LLM(model, device="cpu", quantization=scheme, kernels="native", progress=False)
    theirs = LLM(model, device="cpu", quantization=scheme, kernels="torch", progress=False)
    linears = [m for m in ours.runner.model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert linears and all(m.native for m in linears)
    assert not any(getattr(m, "native", False) for m in theirs.runner.model.modules())
    wiki = data_path("wikitext2", "wiki.valid.tokens")
    got = agreement(ours, theirs, str(wiki), max_tokens=512, progress=False)
    assert got["top1_agreement"] >= 0.93 and got["mean_kl"] < 0.02, got
    assert _greedy_agreement(ours, theirs, PROMPTS, 12) >= 0.9



@needs_native
@pytest.mark.parametrize("model,switches", [
    ("smollm2-135m-instruct", dict(quantization="int4-w8a8")),  # the int4 form of a PhaseLinear, float32
    ("smollm2-135m-instruct", dict(dtype="bfloat16")),  # dense weights
    # int4 and int8 forms, q/k/v biases, keys scaled before an int8 pool
    ("qwen2.5-coder-0.5b-instruct", dict(quantization="gguf", kv_cache_dtype="int8")),
])
def test_a_decode_layer_in_one_call_computes_exactly_what_its_parts_do(model, switches, monkeypatch):
    """`decode_layer` runs a decode step's layer in one call: the same kernels in the same order, so the same
    numbers to the last bit (tokens and log-probabilities of a batch), and it is what decode steps run; a hook on
    a linear sends the steps back through the modules, which call it."""
    from infer_recipes import LLM
    from infer_recipes.config import SamplingParams
    from infer_recipes.models.llama import LlamaDecoderLayer

    smollm2_gguf() if model.startswith("smollm2") else qwen_gguf(model)
    llm = LLM(model, device="cpu", progress=False, prefix_caching=False, **switches)
    layers = [m for m in llm.model.modules() if isinstance(m, LlamaDecoderLayer)]
    assert layers and all(layer.native_step is not None for layer in layers)
    calls = count_decode_layer_calls(monkeypatch)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    fast = llm.generate(PROMPTS[:4], params)
    assert len(calls) >= 15 * len(layers)  # every decode step (a prompt's first token comes from its prefill)
    steps = [layer.native_step for layer in layers]
    for layer in layers:
        layer.native_step = None
    parts = llm.generate(PROMPTS[:4], params)
    for a, b in zip(fast, parts):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.top_logprobs == b.top_logprobs
    for layer, step in zip(layers, steps):
        layer.native_step = step
    seen = []
    layers[0].self_attn.o_proj.register_forward_hook(lambda *_: seen.append(1))
    calls.clear()
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(seen) == 4 and len(calls) == 3 * (len(layers) - 1)  # layer 0 through its modules

def test_torch_kernels_when_asked():
    """`kernels: torch` (and any device but the CPU) never asks for the extension."""
    assert not kernels.wanted("torch", torch.device("cpu"))
    assert not kernels.wanted("native", torch.device("meta"))
    layer = Int4Linear.from_float(torch.randn(32, 64), None, 32, native=False)
    assert not layer.native and layer.scales_zeros.dtype == torch.bfloat16  # torch's form


def _paged_case(g: torch.Generator, bs: int, nblocks: int, lens: list[int]) -> torch.Tensor:
    """Block tables for `lens`, each row its own blocks in random order, with holes between them."""
    per_row = -(-max(lens) // bs)
    return torch.randperm(nblocks, generator=g)[:len(lens) * per_row].view(len(lens), per_row).contiguous()


# lengths that end mid-block, one of a single key, and one long enough for the automatic split of its keys over
# threads; blocks of 16 (one chunk of AVX-512 lanes each) and of 8 (a chunk spans two blocks)
ATTENTION_LENS = [1, 37, 80, 16, 129, 700]
SPLITS = (0, 1, 3, 7)  # 0: the kernel's own choice; 7: most ranges of the short rows hold no key


@needs_native
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (14, 2, 64), (12, 2, 128), (4, 4, 32), (16, 1, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [16, 8])
def test_decode_attention_reads_paged_blocks_in_place(H, Hkv, D, dtype, bs, attention_isa):
    """Against the torch path on the same pool: block tables in any order with holes between them, lengths
    that end mid-block (and one of a single key), GQA ratios 1 to 16, each sequence's keys read whole or split
    into ranges that are merged after (split-K), with one sequence alone too (the split a batch of one takes).
    The reference is float64: over 700 keys torch's own float32 path is 1e-5 off it, the kernel 5e-6."""
    from infer_recipes.layers.attention import _blockwise_decode

    g = torch.Generator().manual_seed(H * D + bs)
    nblocks = 2 * len(ATTENTION_LENS) * -(-max(ATTENTION_LENS) // bs)  # half of them holes
    k_cache = torch.randn(nblocks, Hkv, bs, D, generator=g).to(dtype)
    v_cache = torch.randn(nblocks, Hkv, bs, D, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for lens in (ATTENTION_LENS, ATTENTION_LENS[-1:]):
        blocks = _paged_case(g, bs, nblocks, lens)
        lens = torch.tensor(lens)
        q = torch.randn(len(lens), H, D, generator=g).to(dtype)
        mask = (torch.arange(blocks.shape[1] * bs)[None] < lens[:, None]).view(len(lens), 1, 1, -1)
        ref = _blockwise_decode(q.double(), k_cache.double(), v_cache.double(), blocks.view(-1), mask, D ** -0.5)
        for splits in SPLITS:
            out = torch.empty_like(q)
            kernels.native().decode_attention(q, k_cache, v_cache, blocks.view(-1), lens, D ** -0.5, out,
                                              splits=splits)
            assert torch.allclose(out.double(), ref, atol=tol, rtol=tol), f"splits={splits}"


@needs_native
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (14, 2, 64), (12, 2, 128), (16, 1, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_reads_an_int8_pool_in_place(H, Hkv, D, dtype, attention_isa):
    """An int8 pool (a float32 scale per token and head) against the torch path over the same pool, which
    dequantizes the blocks it gathers, whole and split-K; a bfloat16 query within a bfloat16 step of the float32
    query's result; and the kernel refuses a pool without its scales."""
    from infer_recipes.layers.attention import _blockwise_decode, quantize_kv

    g = torch.Generator().manual_seed(H * D + 1)
    bs = 16
    nblocks = 2 * len(ATTENTION_LENS) * -(-max(ATTENTION_LENS) // bs)  # half of them holes
    (k_cache, k_scale), (v_cache, v_scale) = (quantize_kv(torch.randn(nblocks, Hkv, bs, D, generator=g) * 3)
                                              for _ in range(2))
    blocks = _paged_case(g, bs, nblocks, ATTENTION_LENS)
    lens = torch.tensor(ATTENTION_LENS)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    mask = (torch.arange(blocks.shape[1] * bs)[None] < lens[:, None]).view(len(lens), 1, 1, -1)
    ref = _blockwise_decode(q.double(), k_cache, v_cache, blocks.view(-1), mask, D ** -0.5, k_scale.double(),
                           v_scale.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    out = torch.empty_like(q)
    for splits in SPLITS:
        kernels.native().decode_attention(q, k_cache, v_cache, blocks.view(-1), lens, D ** -0.5, out, k_scale,
                                          v_scale, splits)
        assert torch.allclose(out.double(), ref, atol=tol, rtol=tol), f"splits={splits}"
    if dtype == torch.bfloat16:
        # a bfloat16 query's integer dot products (AVX512-VNNI: q in two int8 levels, the value weights in 16 bits)
        # against the float32 path with the same query: within one bfloat16 step of each output and 1e-4 of the
        # largest (measured: 4e-5 of it beyond the step, where outputs near 0 come from cancelling values)
        exact = torch.empty(q.shape)
        kernels.native().decode_attention(q.float(), k_cache, v_cache, blocks.view(-1), lens, D ** -0.5, exact,
                                          k_scale, v_scale)
        assert ((out.float() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4 * exact.abs().max()).all()
    with pytest.raises(RuntimeError, match="needs its scales"):
        kernels.native().decode_attention(q, k_cache, v_cache, blocks.view(-1), lens, D ** -0.5, out)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_rotary_writes_an_int8_pool_as_quantize_kv_does(dtype, D, isa):
    """The rotary kernel's int8 write: bit for bit the int8 rows and scales `quantize_kv` makes of the keys it
    rotated (in place, in the activation dtype: close to the torch rotation) and of the values."""
    from infer_recipes.layers.attention import quantize_kv
    from infer_recipes.layers.rotary import RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(7)
    H, Hkv, N, bs = 6, 2, 5, 16
    cos, sin = RotaryEmbedding(D, 256, 10000.0)(torch.tensor([0, 17, 3, 200, 31]), dtype)
    qkv = torch.randn(N, (H + 2 * Hkv) * D, generator=g).to(dtype)
    k_ref = apply_rotary(qkv[:, H * D:(H + Hkv) * D].reshape(N, Hkv, D), cos, sin)
    v_ref = qkv[:, (H + Hkv) * D:].reshape(N, Hkv, D).clone()
    pool = [torch.zeros(8, Hkv, bs, D, dtype=torch.int8) for _ in range(2)]
    scales = [torch.zeros(8, Hkv, bs) for _ in range(2)]
    slots = torch.tensor([3, 127, 16, 40, 0])
    kernels.native().rope_cache(qkv, cos.reshape(N, D), sin.reshape(N, D), H, Hkv, *pool, slots, *scales)
    where = slots // bs, slice(None), slots % bs
    rotated = qkv[:, H * D:(H + Hkv) * D].reshape(N, Hkv, D)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    assert torch.allclose(rotated, k_ref, **tol) and torch.equal(qkv[:, (H + Hkv) * D:].reshape(N, Hkv, D), v_ref)
    for cache, scale, written in zip(pool, scales, (rotated, v_ref)):
        want_q, want_s = quantize_kv(written)
        assert torch.equal(cache[where], want_q) and torch.equal(scale[where], want_s)
    untouched = torch.ones(8 * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not pool[0].transpose(1, 2).reshape(8 * bs, -1)[untouched].any()
    with pytest.raises(RuntimeError, match="both scales"):
        kernels.native().rope_cache(qkv, cos.reshape(N, D), sin.reshape(N, D), H, Hkv, *pool, slots, scales[0])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rotary_and_silu_kernels_match_the_torch_layers(dtype, isa):
    """Each small kernel against the layer it replaces, in the activation dtype: RMSNorm with and without the
    residual add, rotary on a fused qkv output with the K/V pool write, silu-and-mul."""
    from infer_recipes.layers.activation import silu_and_mul
    from infer_recipes.layers.norm import RMSNorm
    from infer_recipes.layers.rotary import RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(5)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = (torch.rand(576, generator=g) + 0.5).to(dtype)  # the model casts its norms too
    x, res = torch.randn(7, 576, generator=g).to(dtype), torch.randn(7, 576, generator=g).to(dtype)
    ref_y, ref_sum = norm.forward_with_residual(x, res)
    ref_plain = norm(x)
    norm.use_native(True)
    y, s = norm.forward_with_residual(x, res)
    assert y.dtype == dtype and torch.equal(s, ref_sum) and torch.allclose(y, ref_y, **tol)
    assert torch.allclose(norm(x), ref_plain, **tol)

    H, Hkv, D, N, bs = 6, 2, 64, 5, 16
    rope = RotaryEmbedding(D, 256, 10000.0)
    positions = torch.tensor([0, 17, 3, 200, 31])
    cos, sin = rope(positions, dtype)
    qkv = torch.randn(N, (H + 2 * Hkv) * D, generator=g).to(dtype)
    k_cache, v_cache = torch.zeros(8, Hkv, bs, D, dtype=dtype), torch.zeros(8, Hkv, bs, D, dtype=dtype)
    slots = torch.tensor([3, 127, 16, 40, 0])  # any slots, any order
    q_ref = apply_rotary(qkv[:, :H * D].reshape(N, H, D), cos, sin)
    k_ref = apply_rotary(qkv[:, H * D:(H + Hkv) * D].reshape(N, Hkv, D), cos, sin)
    v_ref = qkv[:, (H + Hkv) * D:].reshape(N, Hkv, D).clone()
    kernels.native().rope_cache(qkv, cos.reshape(N, D), sin.reshape(N, D), H, Hkv, k_cache, v_cache, slots)
    assert torch.allclose(qkv[:, :H * D].reshape(N, H, D), q_ref, **tol)
    assert torch.allclose(k_cache[slots // bs, :, slots % bs], k_ref, **tol)
    assert torch.equal(v_cache[slots // bs, :, slots % bs], v_ref)
    untouched = torch.ones(8 * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.transpose(1, 2).reshape(8 * bs, -1)[untouched].any()
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.native().rope_cache(qkv, cos.reshape(N, D), sin.reshape(N, D), H, Hkv, k_cache, v_cache,
                                    torch.tensor([0, 1, 2, 3, 8 * bs]))

    gate_up = torch.randn(3, 2, 2 * 1536, generator=g).to(dtype)
    assert torch.allclose(kernels.native().silu_mul(gate_up), silu_and_mul(gate_up), **tol)


@needs_native
def test_the_kernels_run_the_best_instruction_set_the_cpu_has():
    assert "avx2" in ISAS and kernels.isa() == ISAS[0]
    with pytest.raises(RuntimeError, match="unknown instruction set sse2"):
        kernels.native().use_isa("sse2")
    if "avx512-vnni" not in ISAS:
        with pytest.raises(RuntimeError, match="does not run avx512-vnni"):
            kernels.native().use_isa("avx512-vnni")
    assert kernels.isa() == ISAS[0]
