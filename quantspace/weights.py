"""Reading safetensors without loading a model: headers for planning, one tensor at a time for converting.

Our own reader (plain file reads, no mmap) keeps resident memory near one tensor and turns a damaged file
into a CorruptWeightsError that names it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import CorruptWeightsError, MissingFileError

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}   # the float dtypes we read
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str            # safetensors dtype name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    file: Path
    start: int            # absolute byte offset in file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def parse_header(raw: bytes, name: str) -> dict[str, Any]:
    """Decode a safetensors header (the JSON after the 8-byte length)."""
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        return header
    except ValueError as exc:
        raise CorruptWeightsError(f"{name} is not a valid safetensors file (bad header: {exc}).") from None


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header and the absolute offset where tensor data starts."""
    with open(path, "rb") as f:
        return _read_header(f, path), f.tell()


def _read_header(f: BinaryIO, path: Path) -> dict[str, Any]:
    head = f.read(8)
    if len(head) != 8:
        raise CorruptWeightsError(f"{path.name} is not a valid safetensors file (too short).")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER:
        raise CorruptWeightsError(f"{path.name} is not a valid safetensors file (header length {length}).")
    raw = f.read(length)
    if len(raw) != length:
        raise CorruptWeightsError(f"{path.name} is truncated (header cut short).")
    return parse_header(raw, path.name)


def entries(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, in file order, checked against the file's size."""
    header, data_start = read_header(path)
    size = path.stat().st_size
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CorruptWeightsError(f"{path.name}: tensor {name} has a malformed header entry.") from None
        if data_start + end > size or end < begin:
            raise CorruptWeightsError(
                f"{path.name} is truncated or corrupt: tensor {name} ends past the end of the file."
            )
        if dtype in ITEMSIZE and (end - begin) != math.prod(shape) * ITEMSIZE[dtype]:
            raise CorruptWeightsError(f"{path.name}: tensor {name} has {end - begin} bytes for shape {shape}.")
        out.append(TensorEntry(name, dtype, shape, path, data_start + begin, end - begin))
    out.sort(key=lambda e: e.start)
    return out


def read_raw(entry: TensorEntry, start: int | None = None, nbytes: int | None = None) -> bytearray:
    """A tensor's bytes (or `nbytes` of them from file offset `start`) with plain file reads: a memory map would
    keep every page it touched resident, and counted, while the file stays open."""
    start = entry.start if start is None else start
    nbytes = entry.nbytes if nbytes is None else nbytes
    buf = bytearray(nbytes)
    with open(entry.file, "rb") as f:
        f.seek(start)
        if f.readinto(buf) != nbytes:
            raise CorruptWeightsError(f"{entry.file.name} ends inside tensor {entry.name}; the file is truncated.")
    return buf


# safetensors dtype → torch dtype name, for read_tensor
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_tensor(entry: TensorEntry) -> Any:
    """One tensor as the file stores it (a torch tensor of its own dtype, on the CPU), read with read_raw."""
    import torch

    if entry.dtype not in TORCH_DTYPES:
        raise CorruptWeightsError(f"Tensor {entry.name} has dtype {entry.dtype}, which is not a type we read.")
    dtype = getattr(torch, TORCH_DTYPES[entry.dtype])
    data = read_raw(entry)
    if not data:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, in shard order."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise CorruptWeightsError(f"model.safetensors.index.json is unreadable: {exc}") from None
        files = [model_dir / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MissingFileError(f"Weight shard {missing[0]} listed in the index is missing.")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"No .safetensors weights in {model_dir}.")
    return files


def all_entries(model_dir: Path) -> list[TensorEntry]:
    return [e for f in weight_files(model_dir) for e in entries(f)]


F16_MAX = 65504.0
_BLOCK_BYTES = 16 * 1024 * 1024


def read_converted(entry: TensorEntry, out: str, row_order: np.ndarray | None = None) -> np.ndarray:
    """Read a tensor straight into its GGUF dtype ("F32", "F16" or "BF16" as uint16 bits), block by block.

    Only the output array and one block of about 16 MB are in memory at once; the casts run in torch (already
    loaded by transformers), which is several times faster than numpy's float16 cast. F16 saturates at ±65504
    rather than writing inf. `row_order` permutes rows (llama.cpp's q/k layout).
    """
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    if entry.dtype not in dtypes:
        raise CorruptWeightsError(f"Tensor {entry.name} has dtype {entry.dtype}, which is not a float type we read.")
    rows = entry.shape[0] if len(entry.shape) > 1 else 1
    result = torch.empty(entry.shape, dtype=dtypes[out])
    flat = result.view(rows, -1)
    row_bytes = entry.nbytes // rows
    step = max(1, _BLOCK_BYTES // max(1, row_bytes))
    buf = bytearray(min(rows, step) * row_bytes)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            view = memoryview(buf)[: (hi - lo) * row_bytes]
            if f.readinto(view) != len(view):
                raise CorruptWeightsError(f"{entry.file.name} is truncated inside tensor {entry.name}.")
            block = torch.frombuffer(view, dtype=dtypes[entry.dtype]).view(hi - lo, -1)
            if out == "F16" and entry.dtype != "F16":
                block = block.float().clamp_(-F16_MAX, F16_MAX)
            flat[lo:hi] = block
    if row_order is not None:
        result = result[torch.from_numpy(row_order)]
    if out == "BF16":
        return result.view(torch.int16).numpy().view(np.uint16)
    return result.numpy()


def safetensors_from_pickle(src: Path, dst: Path) -> Path:
    """Rewrite pickled .bin weights as safetensors (the user opted in), next to copies of the other files.

    torch's weights_only loader refuses arbitrary objects, so a malicious pickle fails instead of running.
    """
    import shutil

    import torch
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CorruptWeightsError(f"{path.name} could not be loaded safely: {exc}") from None
            # clone(): tied weights share storage, which safetensors refuses to save.
            state = {k: v.clone().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
            save_file(state, str(dst / (path.stem + ".safetensors")))
        elif path.is_file() and not path.name.endswith(".index.json"):
            shutil.copy(path, dst / path.name)
    return dst
