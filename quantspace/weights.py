"""Reading safetensors without loading a model: headers for planning, one tensor at a time for converting.

Our own reader (plain file reads, no mmap) keeps resident memory near one tensor, reads bf16 without torch,
and turns a damaged file into a CorruptWeightsError that names it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from .errors import CorruptWeightsError, MissingFileError

_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # kept as raw bits; see to_float32
    "F64": (np.dtype("<f8"), 8),
}
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
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


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
        if dtype in _DTYPES and (end - begin) != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]:
            raise CorruptWeightsError(f"{path.name}: tensor {name} has {end - begin} bytes for shape {shape}.")
        out.append(TensorEntry(name, dtype, shape, path, data_start + begin, end - begin))
    out.sort(key=lambda e: e.start)
    return out


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


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """Load one tensor as float32 (bf16 and f16 widened exactly)."""
    if entry.dtype not in _DTYPES:
        raise CorruptWeightsError(f"Tensor {entry.name} has dtype {entry.dtype}, which is not a float type we read.")
    dtype, _ = _DTYPES[entry.dtype]
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        buf = f.read(entry.nbytes)
    if len(buf) != entry.nbytes:
        raise CorruptWeightsError(f"{entry.file.name} is truncated inside tensor {entry.name}.")
    arr = np.frombuffer(buf, dtype=dtype).reshape(entry.shape)
    return to_float32(arr, entry.dtype)


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def float32_to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 → bfloat16 bit patterns (NaN stays NaN)."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(arr)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def iter_tensors(items: list[TensorEntry]) -> Iterator[tuple[TensorEntry, np.ndarray]]:
    for entry in items:
        yield entry, read_tensor(entry)


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
