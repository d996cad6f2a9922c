"""Importance matrices (imatrix) in llama.cpp's GGUF format: what llama-imatrix writes and llama-quantize reads.

Per weight llama.cpp quantizes, the sum over calibration tokens of each input column's squared activation
(`<gguf name>.in_sum2`, F32 [n_mat, ne0]) and the number of tokens summed (`<gguf name>.counts`, F32 [n_mat, 1]);
n_mat is 1 for a matrix and the number of experts for a mixture-of-experts tensor (`ffn_*_exps`), each expert
with its own count. Metadata: general.type "imatrix", imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size.
The quantizer weighs each column's rounding error by in_sum2 / count (quantspace.imatrix_compute computes them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadOptionError

IMATRIX_NAME = "imatrix.gguf"
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass(frozen=True)
class Entry:
    sums: np.ndarray     # float32 [n_mat, ne0]: Σ x² per input column (per expert)
    counts: np.ndarray   # float32 [n_mat]: tokens summed (per expert)

    def values(self) -> np.ndarray:
        """What llama.cpp's quantizer takes: the mean square per column, flattened expert by expert; an expert
        no token reached gets 1 everywhere (no preference), as llama-quantize does."""
        out = np.ones_like(self.sums, dtype=np.float32)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen, None]
        return np.ascontiguousarray(out.reshape(-1), dtype=np.float32)


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)   # GGUF weight name → sums and counts
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: Path | None = None     # the file it was read from or written to

    @property
    def dataset(self) -> str:
        return self.datasets[0] if self.datasets else ""


def write_imatrix(imatrix: Imatrix, path: Path) -> Path:
    """Write the GGUF llama-imatrix writes (tensors in name order), atomically."""
    import gguf

    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch="")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)   # as llama-imatrix: general.type says what it is
    try:
        writer.add_string(KEY_TYPE, "imatrix")
        writer.add_array(KEY_DATASETS, list(imatrix.datasets) or ["unknown"])
        writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.entries):
            e = imatrix.entries[name]
            writer.add_tensor(name + SUMS, np.ascontiguousarray(e.sums, dtype=np.float32))
            writer.add_tensor(name + COUNTS, np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    imatrix.path = path
    return path


def read_imatrix(path: Path | str) -> Imatrix:
    """An imatrix GGUF (ours or llama-imatrix's); BadOptionError in one line for anything else."""
    import gguf

    from .source import folder_allowed

    path = Path(path).expanduser()
    if not folder_allowed(path):   # a visitor of a Space must not read (or publish) the Space's own files
        raise BadOptionError(f"imatrix '{path}' is a file on this Space's disk; give 'auto' or 'off' here.")
    if not path.is_file():
        raise BadOptionError(f"No imatrix file at {path}.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:   # not GGUF at all: gguf-py raises ValueError, struct or numpy errors
        with open(path, "rb") as f:
            head = f.read(4)
        legacy = head != b"GGUF" and path.suffix == ".dat"
        hint = (" It looks like llama-imatrix's old .dat format: convert it with "
                f"`llama-imatrix --in-file {path.name} -o imatrix.gguf`." if legacy else "")
        raise BadOptionError(f"{path.name} is not an imatrix GGUF file ({type(exc).__name__}).{hint}") from None
    kind = _string(reader, KEY_TYPE)
    if kind != "imatrix":
        what = f"a GGUF of type '{kind}'" if kind else "a GGUF without general.type"
        raise BadOptionError(f"{path.name} is {what}, not an importance matrix (general.type 'imatrix').")
    tensors = {t.name: t for t in reader.tensors}
    entries: dict[str, Entry] = {}
    for tname, t in tensors.items():
        if not tname.endswith(SUMS):
            continue
        name = tname[:-len(SUMS)]
        counts = tensors.get(name + COUNTS)
        if counts is None:
            raise BadOptionError(f"{path.name} has sums but no counts for {name}; the file is damaged.")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or counts.tensor_type != gguf.GGMLQuantizationType.F32:
            raise BadOptionError(f"{path.name}: the sums and counts of {name} must be F32.")
        c = np.array(counts.data, dtype=np.float32).reshape(-1)
        s = np.array(t.data, dtype=np.float32).reshape(len(c), -1)
        entries[name] = Entry(s, c)
    if not entries:
        raise BadOptionError(f"{path.name} holds no importance matrix entries.")
    datasets = _strings(reader, KEY_DATASETS)
    return Imatrix(entries, datasets, _int(reader, KEY_CHUNK_COUNT), _int(reader, KEY_CHUNK_SIZE), path)


def check_fits(imatrix: Imatrix, gguf_path: Path) -> None:
    """Refuse, in one line, an imatrix made for another model: an entry for a weight this model does not
    have, or with another width (llama-quantize would stop on that mid-run)."""
    import gguf

    widths = {t.name: int(t.shape[0]) * (int(t.shape[2]) if len(t.shape) > 2 else 1)
              for t in gguf.GGUFReader(gguf_path).tensors}
    for name, entry in imatrix.entries.items():
        if name not in widths:
            raise BadOptionError(f"The imatrix {_shown(imatrix)} has an entry for {name}, a weight this model "
                                 "does not have: it was made for another model.")
        if entry.sums.size != widths[name]:
            raise BadOptionError(f"The imatrix {_shown(imatrix)} has {entry.sums.size} values for {name}, the "
                                 f"model {widths[name]}: it was made for another model.")


def _shown(imatrix: Imatrix) -> str:
    return imatrix.path.name if imatrix.path else "given"


def _field(reader, key):  # noqa: ANN001, ANN202
    return reader.fields.get(key)


def _string(reader, key: str) -> str | None:  # noqa: ANN001
    f = _field(reader, key)
    if f is None or not f.data:
        return None
    try:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    except (IndexError, TypeError):
        return None


def _strings(reader, key: str) -> list[str]:  # noqa: ANN001
    f = _field(reader, key)
    if f is None:
        return []
    try:
        return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
    except (IndexError, TypeError):
        return []


def _int(reader, key: str) -> int:  # noqa: ANN001
    f = _field(reader, key)
    try:
        return int(f.parts[f.data[0]][0]) if f is not None else 0
    except (IndexError, TypeError, ValueError):
        return 0
