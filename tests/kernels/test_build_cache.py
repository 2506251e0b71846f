"""The kernels' build cache: a new build removes old ones beyond the few most recently used, never one being built."""
from __future__ import annotations

import fcntl
import os

import pytest

from infer_recipes import kernels


def _builds(folder, names):
    for i, name in enumerate(names):
        d = folder / f"infer_recipes_kernels_{name}"
        d.mkdir()
        (d / f"infer_recipes_kernels_{name}.so").write_bytes(b"x" * 1000)
        os.utime(d, (1000.0 + i, 1000.0 + i))  # used in the order given: the last most recently


def test_a_new_build_keeps_the_most_recently_used_others_and_removes_the_rest(tmp_path):
    _builds(tmp_path, ["a", "b", "c", "d", "e", "f"])
    (tmp_path / "notes.txt").write_text("not a build")
    removed = kernels.prune(tmp_path, "infer_recipes_kernels_a", keep=2)  # the current build is the oldest
    assert sorted(removed) == ["infer_recipes_kernels_b", "infer_recipes_kernels_c", "infer_recipes_kernels_d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "infer_recipes_kernels_a", "infer_recipes_kernels_e", "infer_recipes_kernels_f", "notes.txt"]


def test_a_build_another_process_holds_is_left_alone(tmp_path):
    _builds(tmp_path, ["a", "b", "c"])
    with open(tmp_path / "infer_recipes_kernels_a" / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another open file: flock conflicts as with another process
        removed = kernels.prune(tmp_path, "infer_recipes_kernels_c", keep=0)
    assert removed == ["infer_recipes_kernels_b"]
    assert (tmp_path / "infer_recipes_kernels_a").is_dir() and (tmp_path / "infer_recipes_kernels_c").is_dir()


@pytest.mark.skipif(not kernels.available(), reason="the native kernels do not run here")
def test_loading_marks_the_build_used():
    folder = kernels.cache_dir() / "kernels" / f"infer_recipes_kernels_{kernels._key()}"
    os.utime(folder, (1000.0, 1000.0))
    kernels._build()
    assert folder.stat().st_mtime > 1000.0
