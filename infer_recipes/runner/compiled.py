"""Regional compilation: every decoder layer of a model through one `torch.compile`d function.

Its only dynamic dimension is the token count N; paged attention is one opaque custom op inside it, so how the N
tokens split into sequences never reaches the graph. Sizes of 1 are specialised by the compiler, so N = 1 and
N > 1, each for the first layer (no residual yet) and the others, make 4 graphs; the runner's `warm_up` compiles
them all, and `compiles` counts every compilation so a recompile cannot hide.
"""
from __future__ import annotations

import functools
import itertools
import types

import torch

from ..layers.attention import PagedMetadata
from ..models.llama import LlamaForCausalLM

_RUNNER_IDS = itertools.count()


class CompiledLayers:
    """Regional compilation: every decoder layer runs one `torch.compile`d function with dynamic dimensions.

    The layers share their code, so the compiled graphs are shared too: compile time is one layer's, not the whole
    model's (seconds rather than minutes for 30 layers). Embedding, final norm and lm_head stay eager: one op each.
    The backend is Inductor, wrapped to count compilations; after `ModelRunner.warm_up` a count that moves is a
    recompile. fullgraph=True makes a graph break an error instead of a silent slow path.
    """

    def __init__(self, model: LlamaForCausalLM):
        import torch._dynamo

        self.compiles = 0
        # the compiler keeps graphs per code object, and what it learnt about sizes per code name: a private,
        # uniquely named copy of the layer function gives this runner graphs of its own, so another model in the
        # process (other head counts) can neither evict them nor turn their static sizes dynamic
        name = f"run_layer_{next(_RUNNER_IDS)}"
        code = _run_layer.__code__
        names = {"co_name": name, **({"co_qualname": name} if hasattr(code, "co_qualname") else {})}
        run_layer = types.FunctionType(code.replace(**names), _run_layer.__globals__, name)
        # 2 graph classes x (first layer, other layers), more once quantized layers differ: above the default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled = torch.compile(run_layer, backend=self._backend, fullgraph=True)
        for i in model.layer_range:
            layer = model.model.layers[i]
            layer.forward = functools.partial(self, layer)  # the instance's forward; the class's stays eager

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs)

    @staticmethod
    def _mark(t: torch.Tensor | None, dims: tuple[int, ...]) -> None:
        import torch._dynamo

        if t is None:
            return
        for dim in dims:
            # the compiler specialises sizes 0 and 1 (those get their own graph). "maybe": no range is declared,
            # since Inductor bounds some sizes for its own kernel choices (cache length <= 4096 on CPU): a step
            # beyond such a bound recompiles once, and the counter shows it
            if t.shape[dim] >= 2:
                torch._dynamo.maybe_mark_dynamic(t, dim)

    def __call__(self, layer, h, residual, cos, sin, meta: PagedMetadata, kv):
        for t in (h, residual):
            self._mark(t, (1,))  # tokens
        for t in (cos, sin, meta.slot_mapping, meta.layout):
            self._mark(t, (0,))
        return self._compiled(layer, h, residual, cos, sin, meta, kv)


def _run_layer(layer, h, residual, cos, sin, meta, kv):
    return type(layer).forward(layer, h, residual, cos, sin, meta, kv)
