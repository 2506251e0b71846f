"""A fast reader of a GGUF file's header: metadata and tensor table, tensors as views of one memory map.

`gguf.GGUFReader` builds a numpy view per element of every metadata array, which costs ~6 s on a 151,936-token
vocabulary (its tokens and merges are ~300,000 strings) before a single weight is read; this walks the same
layout with `struct` in a fraction of a second. The layout (little-endian): magic `GGUF`, version, tensor count,
metadata count; each metadata entry a key string, a value type and the value (arrays: item type, count, items);
then per tensor its name, dimensions (innermost first), type and offset into the data section, which starts at
the next multiple of `general.alignment` (32 by default). `gguf` stays our source for the block sizes and the
dequantizers.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")  # a string's byte count
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # as the file lists it: innermost dimension first
    data: np.ndarray  # float types: [rows..., cols] of that dtype; block types: uint8 [rows..., bytes per row]


class GGUFFile:
    """fields: key -> value (int, float, bool, str, or a list for arrays); tensors in file order."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._map)
        if bytes(self._buf[:4]) != MAGIC:
            raise ValueError("not a GGUF file (no GGUF magic)")
        self._pos = len(MAGIC)
        self.version = self._scalar("<I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_fields = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._scalar("<Q") for _ in range(self._scalar("<I")))
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = [self._tensor(name, dims, kind, start + offset) for name, dims, kind, offset in infos]

    def _scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        return self._strings(1)[0]

    def _strings(self, count: int) -> list[str]:
        """`count` strings in a row: one tight loop (a 151,936-token vocabulary and its merges are ~300,000)."""
        buf, pos, end, length = self._buf, self._pos, len(self._buf), _LENGTH.unpack_from
        out = []
        for _ in range(count):
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > end:
                raise ValueError("a string runs past the end of the file")
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self._pos = pos
        return out

    def _value(self, kind: int):
        if kind == STRING:
            return self._string()
        if kind in _SCALARS:
            return self._scalar(_SCALARS[kind])
        if kind != ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self._scalar("<I"), self._scalar("<Q")
        if item == STRING:
            return self._strings(count)
        if item in _NUMPY:
            values = np.frombuffer(self._buf, dtype=_NUMPY[item], count=count, offset=self._pos)
            self._pos += values.nbytes
            return values.tolist()
        return [self._value(item) for _ in range(count)]  # arrays of arrays

    def _tensor(self, name: str, dims: tuple[int, ...], kind: int, offset: int) -> TensorInfo:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType(kind)
        rows = tuple(reversed(dims[1:]))
        if qtype.name in _FLOAT_DTYPES:
            dtype, count, shape = _FLOAT_DTYPES[qtype.name], int(np.prod(dims)), (*rows, dims[0])
        else:
            elements, nbytes = GGML_QUANT_SIZES[qtype]
            dtype, count, shape = np.uint8, int(np.prod(rows, dtype=np.int64)) * dims[0] // elements * nbytes, \
                (*rows, dims[0] // elements * nbytes)
        if offset + count * np.dtype(dtype).itemsize > len(self._buf):
            raise ValueError(f"tensor {name} runs past the end of the file")
        data = np.frombuffer(self._buf, dtype=dtype, count=count, offset=offset).reshape(shape)
        return TensorInfo(name, qtype, dims, data)
