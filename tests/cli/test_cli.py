"""The command line: the answer it gives, and one clear line (exit 2, no traceback) for each bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import smollm2_gguf


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infer_recipes", *args], capture_output=True, text=True,
                          input=stdin, timeout=600)


def test_generate_chat_answers_paris():
    smollm2_gguf()
    res = run("generate", "--model", "smollm2-135m-instruct", "--chat", "--prompt", "What is the capital of France?")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert "loaded smollm2-135m-instruct" in res.stderr  # the load time is printed


def test_generate_json_and_info():
    smollm2_gguf()
    res = run("generate", "--model", "smollm2-135m-instruct", "--prompt", "One, two, three,", "--max-tokens", "5",
              "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["token_ids"]) == out["completion_tokens"] == 5 and out["finish_reason"] == "length"
    assert out["timings"]["ttft_s"] > 0 and out["timings"]["decode_tokens_per_s"] > 0
    info = json.loads(run("info", "smollm2-135m-instruct", "--json").stdout)
    assert info["parameters"] == 134_515_008 and info["context_length"] == 8192 and info["tied_embeddings"]


def test_chat_streams_a_reply():
    smollm2_gguf()
    res = run("chat", "--model", "smollm2-135m-instruct", "--max-tokens", "24",
              stdin="What is the capital of France?\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def _bad_gguf(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        with open(smollm2_gguf(), "rb") as f:
            path.write_bytes(f.read(4096))
    else:
        path.write_bytes(b"GGUF" + bytes(range(256)) * 16)
    return str(path)


def _unsupported_dir(tmp_path) -> str:
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return str(d)


@pytest.mark.parametrize("case", ["missing", "truncated", "corrupted", "unsupported", "alias", "preset",
                                  "too-long", "max-tokens", "device", "temperature"])
def test_bad_input_gives_one_clear_line(tmp_path, case):
    model, extra = "smollm2-135m-instruct", []
    if case == "missing":
        model = str(tmp_path / "nowhere")
    elif case in ("truncated", "corrupted"):
        model = _bad_gguf(tmp_path, case)
    elif case == "unsupported":
        model = _unsupported_dir(tmp_path)
    elif case == "alias":
        model = "llama-9000"
    elif case == "preset":
        model = "synthetic:llama-9000"
    elif case == "max-tokens":
        extra = ["--max-tokens", "0"]
    elif case == "device":
        extra = ["--device", "tpu"]
    elif case == "temperature":
        extra = ["--temperature", "-1"]
    prompt = "hello " * 9000 if case == "too-long" else "hi"
    if case == "too-long":
        smollm2_gguf()
    res = run("generate", "--model", model, "--prompt", prompt, *extra)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    expected = {"missing": "not found", "truncated": "truncated", "corrupted": "corrupted",
                "unsupported": "unsupported architecture", "alias": "not found", "preset": "unknown synthetic preset",
                "too-long": "8192", "max-tokens": "max_tokens", "device": "unknown device",
                "temperature": "temperature"}[case]
    assert expected in lines[0]


def test_unavailable_cuda_is_explained():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = run("generate", "--device", "cuda", "--prompt", "hi")
    assert res.returncode == 2 and "use --device cpu" in res.stderr and "Traceback" not in res.stderr
