"""A GGUF file's architecture and tensor directory, read straight from its header.

gguf.GGUFReader builds a numpy view of every metadata value, each of a 50k vocabulary's strings included: 5–15 s on
a small CPU for a file whose tensors we only want to list. This skips the values and reads the directory.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantizeError

# Byte sizes of GGUF's fixed-size value types (uint8 .. float64; 8 = string and 9 = array are read apart).
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Header:
    architecture: str                                  # general.architecture ("" when absent)
    tensors: dict[str, tuple[tuple[int, ...], int]]    # name → (shape in ggml order, ggml type id)
    offsets: dict[str, int]                            # name → where its data starts in the file


def read_header(path: Path) -> Header:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise QuantizeError(f"{Path(path).name} is not a GGUF file.")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return buf[pos - n:pos].decode("utf-8", errors="replace")

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype == _STRING:
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + n
            elif vtype == _ARRAY:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype in _SIZES:
                    pos += count * _SIZES[etype]
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                pos += _SIZES[vtype]

        arch, alignment = "", 32
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if key == "general.architecture" and vtype == _STRING:
                arch = string()
            elif key == "general.alignment" and vtype == 4:   # uint32
                (alignment,) = struct.unpack_from("<I", buf, pos)
                pos += 4
            else:
                skip(vtype)
        tensors, relative = {}, {}
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            (ggml_type,) = struct.unpack_from("<I", buf, pos + 4 + 8 * n_dims)
            (relative[name],) = struct.unpack_from("<Q", buf, pos + 4 + 8 * n_dims + 4)
            tensors[name] = (tuple(int(d) for d in dims), int(ggml_type))
            pos += 4 + 8 * n_dims + 4 + 8   # dims, type, offset
    data = -(-pos // alignment) * alignment   # the tensor data starts at the next multiple of the alignment
    return Header(arch, tensors, {name: data + int(off) for name, off in relative.items()})
