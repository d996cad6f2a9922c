"""A GGUF file's weights, dequantized, under the source's tensor names: the layer-by-layer walk
(quantspace.reference) measures the GGUF with them in PyTorch, on a GPU where this llama.cpp build has no CUDA.

Only for files our streaming converter wrote: its plan says which GGUF tensor each source tensor became and how
(q/k rows permuted for llama.cpp's RoPE, Gemma's norms shifted by one, the embedding trimmed), and the inverse is
applied here. gguf-py dequantizes the types llama.cpp writes, on the CPU; the values are exactly the ones
llama.cpp multiplies with (it also rounds the activations to 8 bits for most types, which this does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CorruptWeightsError
from .gguf_header import read_header
from .reference import SourceWeights
from .weights import TensorEntry, read_raw


class GGUFWeights(SourceWeights):
    """The tensors of a GGUF (all shards of a split one) as float32, named as in the source folder."""

    def __init__(self, gguf_files: Sequence[Path], model_dir: Path):
        from .archs import load_config
        from .converter.streaming import HParams, plan
        from .weights import all_entries

        hp = HParams.from_config(load_config(model_dir))
        if hp.spec is None:
            raise CorruptWeightsError("This GGUF was not written by QuantSpace's converter; it cannot be read back "
                                      "under the source's tensor names.")
        where: dict[str, tuple[Path, int, tuple[int, ...], int]] = {}
        for path in gguf_files:
            header = read_header(Path(path))
            for name, (shape, ggml_type) in header.tensors.items():
                where[name] = (Path(path), header.offsets[name], shape, ggml_type)
        self.entries = {}
        self._planned: dict[str, tuple[Any, TensorEntry, int]] = {}   # source name → (plan, GGUF tensor, type)
        for p in plan(all_entries(model_dir), hp.spec, hp, "F16"):
            if p.entry is None:   # made by the converter (rope_freqs): llama.cpp's own, not a source tensor
                continue
            if p.name not in where:
                raise CorruptWeightsError(f"{Path(gguf_files[0]).name} has no tensor {p.name}; it was not made "
                                          "from this source.")
            path, offset, ggml_shape, ggml_type = where[p.name]
            stored = TensorEntry(p.name, str(ggml_type), ggml_shape, path, offset, 0)
            self._planned[p.entry.name] = (p, stored, ggml_type)
            self.entries[p.entry.name] = replace(p.entry, shape=tuple(p.shape))

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        p = self._planned[self.entry(name).name][0]
        if len(p.shape) < 2 or p.permute_heads:   # norms, biases; q/k rows interleaved per head: all at once
            return self._values(name, 0, p.shape[0]).to(device)
        return self.rows(name, 0, p.shape[0], device)

    def rows(self, name: str, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        p = self._planned[self.entry(name).name][0]
        if p.permute_heads:
            return self._values(name, 0, p.shape[0])[lo:hi].to(device)
        return self._values(name, lo, hi).to(device)

    def _values(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """float32 rows lo..hi of the source tensor (a 1-D tensor is read whole), the converter's changes undone."""
        import gguf

        from .converter.streaming import permute_rows

        p, stored, ggml_type = self._planned[name]
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = stored.shape[0] // block * type_size   # ggml's first dimension runs along a row
        if len(p.shape) < 2:
            lo, hi = 0, 1
        data = read_raw(stored, stored.start + lo * row_bytes, (hi - lo) * row_bytes)
        try:
            values = gguf.quants.dequantize(np.frombuffer(data, dtype=np.uint8).reshape(-1, row_bytes), qtype)
        except NotImplementedError:
            raise CorruptWeightsError(f"gguf-py cannot dequantize {qtype.name} ({name}).") from None
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        t = t.reshape(hi - lo, *p.shape[1:]) if len(p.shape) >= 2 else t.reshape(p.shape)
        if p.permute_heads:   # llama.cpp's row r is the source's row order[r]
            order = torch.from_numpy(permute_rows(np.arange(p.shape[0]), p.permute_heads))
            t = torch.empty_like(t).index_copy_(0, order, t)
        if p.shift:
            t -= p.shift
        return t

