"""The converted-weights cache: a quantized model is saved once, memory-mapped afterwards, computes exactly what
the fresh conversion computes, and is converted again when the file is unreadable or the switches differ."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import smollm2_gguf
from infer_recipes import LLM
from infer_recipes.config import STALE_PARTIAL_SECONDS
from infer_recipes.runner import converted


@pytest.fixture
def cache(tmp_path, monkeypatch):
    smollm2_gguf()
    monkeypatch.setenv("INFER_RECIPES_CACHE", str(tmp_path))
    monkeypatch.setenv("INFER_RECIPES_CONVERTED_CACHE", "1")
    return tmp_path / "converted"


def _llm(**switches):
    return LLM("smollm2-135m-instruct", device="cpu", dtype="bfloat16", progress=False, **switches)


def test_saved_once_then_mapped_with_the_same_logits(cache):
    ids = list(range(100, 140))
    fresh = _llm(quantization="gguf")
    assert not getattr(fresh.model, "from_cache", False)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    os.utime(files[0], (1, 1))  # long unused
    again = _llm(quantization="gguf")
    assert again.model.from_cache
    assert files[0].stat().st_mtime > 1  # a hit marks the file used
    assert torch.equal(fresh.logits(ids), again.logits(ids))
    assert again.weight_bytes() == fresh.weight_bytes()
    _llm(quantization="int8")  # another scheme: another file
    assert len(list(cache.glob("*.pt"))) == 2


def test_an_unreadable_file_is_converted_again(cache, capsys):
    _llm(quantization="int8")
    (path,) = cache.glob("*.pt")
    path.write_bytes(path.read_bytes()[:4096])  # truncated
    llm = _llm(quantization="int8")
    assert not getattr(llm.model, "from_cache", False)
    assert "unreadable" in capsys.readouterr().err
    assert _llm(quantization="int8").model.from_cache  # and saved again


def test_float_models_are_not_cached(cache):
    _llm()
    assert not cache.exists() or not list(cache.glob("*.pt"))


def test_a_model_over_the_cap_is_not_saved_and_the_load_says_why(cache, monkeypatch, capsys):
    monkeypatch.setenv("INFER_RECIPES_CONVERTED_CACHE_GB", "0.01")
    llm = _llm(quantization="int8")
    assert not list(cache.glob("*"))
    err = capsys.readouterr().err
    assert "not cached" in err and "exceed the cache's cap of 0.01 GB" in err
    assert llm.logits(list(range(100, 110))).isfinite().all()  # the model itself is fine


def _files(folder, sizes_and_ages):
    folder.mkdir(parents=True, exist_ok=True)
    now = 1_000_000.0
    for name, size, age in sizes_and_ages:
        (folder / name).write_bytes(b"x" * size)
        os.utime(folder / name, (now - age, now - age))
    return now


def test_room_is_made_by_evicting_the_least_recently_used(tmp_path):
    now = _files(tmp_path, [("a.pt", 300, 30), ("b.pt", 300, 20), ("c.pt", 300, 10)])
    # cap 1000: the new 300 fits only once the oldest goes
    assert converted.make_room(tmp_path, 300, 1000, 1 << 40, now) is None
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.pt", "c.pt"]
    # 700 more: b goes, c (used later) stays
    assert converted.make_room(tmp_path, 700, 1000, 1 << 40, now) is None
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]
    assert converted.make_room(tmp_path, 1000, 1000, 1 << 40, now) is None
    assert not list(tmp_path.iterdir())


def test_room_is_made_for_the_disk_too(tmp_path):
    now = _files(tmp_path, [("a.pt", 300, 30), ("b.pt", 300, 20)])
    free = converted.DISK_RESERVE + 100  # the cap allows it, the disk does not until a (the older) goes
    assert converted.make_room(tmp_path, 350, 1 << 40, free, now) is None
    assert [f.name for f in tmp_path.iterdir()] == ["b.pt"]


def test_what_cannot_fit_evicts_nothing_and_says_why(tmp_path):
    now = _files(tmp_path, [("a.pt", 300, 30)])
    assert "exceed the cache's cap" in converted.make_room(tmp_path, 2000, 1000, 1 << 40, now)
    assert "disk has" in converted.make_room(tmp_path, 500, 1 << 40, converted.DISK_RESERVE, now)
    assert [f.name for f in tmp_path.iterdir()] == ["a.pt"]


def test_a_dead_writers_partial_file_is_removed_a_live_ones_kept(tmp_path):
    now = _files(tmp_path, [("x.pt.1.partial", 10, 2 * STALE_PARTIAL_SECONDS),
                            ("y.pt.2.partial", 10, 60)])
    assert converted.make_room(tmp_path, 1, 1000, 1 << 40, now) is None
    assert [f.name for f in tmp_path.iterdir()] == ["y.pt.2.partial"]


def test_a_bad_cap_is_named_and_the_default_used(monkeypatch, capsys):
    monkeypatch.setenv("INFER_RECIPES_CONVERTED_CACHE_GB", "lots")
    assert converted.budget() == int(converted.DEFAULT_BUDGET_GB * (1 << 30))
    assert "INFER_RECIPES_CONVERTED_CACHE_GB='lots' is not a number" in capsys.readouterr().err
    monkeypatch.setenv("INFER_RECIPES_CONVERTED_CACHE_GB", "1.5")
    assert converted.budget() == int(1.5 * (1 << 30))
