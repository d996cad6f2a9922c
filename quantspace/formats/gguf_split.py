"""Split GGUF files: a file above --split-max-size becomes llama.cpp's shards, <stem>-00001-of-0000N.gguf, each
a valid GGUF with the split.* keys and the model's metadata in the first only (as llama-gguf-split writes them).
llama.cpp, Ollama and LM Studio load the set from the first shard."""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf

from ..errors import BadOptionError, QuantizeError

DEFAULT = "48G"   # under the Hub's 50 GB per-file limit, with room for the header
# decimal units, as the Hub counts file sizes
UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
         "T": 10**12, "TB": 10**12}
MINIMUM = 10**6   # smaller shards are only more files (and llama.cpp allows at most 65535 of them)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def parse_size(text: str | int | None) -> int:
    """--split-max-size in bytes; 0 for "0"/"off" (never split). BadOptionError, in one line, otherwise."""
    value = str(text if text is not None else "").strip()
    if value.lower() in ("0", "off", "none", "no"):
        return 0
    m = _SIZE.match(value)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in UNITS:
        raise BadOptionError(f"--split-max-size {value!r} is not a size: use a number with K, M, G or T "
                             f"(decimal, as the Hub counts; e.g. {DEFAULT}, 2M), or 0/off to never split.")
    size = int(float(m.group(1)) * UNITS[unit])
    if size < MINIMUM:
        raise BadOptionError(f"--split-max-size {value!r} is below 1M; use a larger size, or 0/off to never split.")
    return size


def shard_name(stem: str, no: int, count: int) -> str:
    """llama.cpp's name for shard `no` (1-based) of `count` (llama_split_path)."""
    return f"{stem}-{no:05d}-of-{count:05d}.gguf"


def shards_of(path: Path) -> list[Path]:
    """Every file of a GGUF: the shards beside a first shard, or the file itself."""
    m = SHARD.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    return [path.with_name(shard_name(m.group("prefix"), i, count)) for i in range(1, count + 1)]


def remove(path: Path) -> None:
    for p in shards_of(path):
        p.unlink(missing_ok=True)


# --- writing shards ---

_HEADER = 4 + 4 + 8 + 8   # magic, version, tensor count, key-value count


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _split_kv(no: int, count: int, n_tensors: int) -> bytes:
    """split.no, split.count (uint16) and split.tensors.count (int32), as llama-gguf-split writes them."""
    T = gguf.GGUFValueType
    return (_string(gguf.Keys.Split.LLM_KV_SPLIT_NO) + struct.pack("<IH", T.UINT16, no)
            + _string(gguf.Keys.Split.LLM_KV_SPLIT_COUNT) + struct.pack("<IH", T.UINT16, count)
            + _string(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT) + struct.pack("<Ii", T.INT32, n_tensors))


@dataclass(frozen=True)
class _Tensor:
    info: bytes      # its tensor-info entry without the trailing data offset
    start: int       # absolute offset of its data in the source
    nbytes: int


@dataclass(frozen=True)
class _Source:
    version: int
    kv: bytes        # every key-value entry, byte for byte
    n_kv: int
    align: int
    tensors: list[_Tensor]


def _read(path: Path) -> _Source:
    reader = gguf.GGUFReader(path)
    align = reader.alignment
    fields = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    if any(f.name.startswith("split.") for f in fields):
        raise QuantizeError(f"{path.name} is already a shard of a split GGUF; it cannot be split again.")
    tensors = []
    for t in reader.tensors:
        size = sum(p.nbytes for p in t.field.parts)
        raw = bytes(reader.data[t.field.offset:t.field.offset + size - 8])   # the last part is the data offset
        tensors.append(_Tensor(raw, int(t.data_offset), int(t.n_bytes)))
    kv_end = reader.tensors[0].field.offset if reader.tensors else _HEADER
    source = _Source(int(reader.fields["GGUF.version"].parts[-1][0]), bytes(reader.data[_HEADER:kv_end]),
                     len(fields), align, tensors)
    del reader   # its memory map must go before the file is truncated
    return source


def _plan(src: _Source, limit: int) -> list[list[_Tensor]]:
    """Tensors in file order, cut into shards whose whole file (header, metadata, padding) stays within `limit`;
    a tensor larger than that alone gets a shard of its own (as llama-gguf-split; llama.cpp cannot cut one)."""
    split_kv = len(_split_kv(0, 1, 0))
    shards: list[list[_Tensor]] = []
    current: list[_Tensor] = []
    meta, data = _HEADER + split_kv + len(src.kv), 0   # the first shard holds the metadata
    for t in src.tensors:
        grown_meta, grown_data = meta + len(t.info) + 8, data + _pad(t.nbytes, src.align)
        if current and _pad(grown_meta, src.align) + grown_data > limit:
            shards.append(current)
            current, meta, data = [], _HEADER + split_kv, 0
            grown_meta, grown_data = meta + len(t.info) + 8, _pad(t.nbytes, src.align)
        current.append(t)
        meta, data = grown_meta, grown_data
    if current:
        shards.append(current)
    return shards


def _write_shard(fin: BinaryIO, out: Path, src: _Source, tensors: list[_Tensor], no: int, count: int) -> None:
    n_total = len(src.tensors)
    kv = (src.kv if no == 0 else b"") + _split_kv(no, count, n_total)
    n_kv = (src.n_kv if no == 0 else 0) + 3
    with open(out, "wb") as f:
        f.write(struct.pack("<IIQQ", gguf.GGUF_MAGIC, src.version, len(tensors), n_kv))
        f.write(kv)
        offset = 0
        for t in tensors:
            f.write(t.info + struct.pack("<Q", offset))
            offset += _pad(t.nbytes, src.align)
        f.write(b"\0" * (_pad(f.tell(), src.align) - f.tell()))
        for t in tensors:
            fin.seek(t.start)
            left = t.nbytes
            while left:
                chunk = fin.read(min(left, 64 << 20))
                if not chunk:
                    raise OSError(f"{out.name}: the source ended early")
                f.write(chunk)
                left -= len(chunk)
            f.write(b"\0" * (_pad(t.nbytes, src.align) - t.nbytes))


def split_file(path: Path, limit: int) -> tuple[Path, ...]:
    """`path` as it is when it fits in `limit` bytes (or limit is 0), else its shards, which replace it.
    The last shard is written first and the source cut short behind it, so the disk holds at most one shard
    more than the file at any time (a 70B F16 is 140 GB)."""
    if not limit or path.stat().st_size <= limit:
        return (path,)
    src = _read(path)
    groups = _plan(src, limit)
    if len(groups) == 1:
        return (path,)
    starts = [t.start for t in src.tensors]
    in_order = starts == sorted(starts)
    stem = path.name[:-len(".gguf")] if path.name.endswith(".gguf") else path.name
    finals = [path.with_name(shard_name(stem, i + 1, len(groups))) for i in range(len(groups))]
    partials = [p.with_name(f".{p.name}.partial") for p in finals]
    cut = False
    try:
        with open(path, "r+b") as fin:
            for no in reversed(range(len(groups))):
                _write_shard(fin, partials[no], src, groups[no], no, len(groups))
                if in_order:   # what was just copied is no longer needed in the source
                    fin.truncate(groups[no][0].start)
                    cut = True
        for partial, final in zip(partials, finals):
            os.replace(partial, final)
    except BaseException:
        if cut:   # a file cut short is no model: nothing of this variant is left
            path.unlink(missing_ok=True)
        raise
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)
    path.unlink()
    return tuple(finals)
