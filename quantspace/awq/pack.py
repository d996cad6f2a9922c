"""The AWQ "GEMM" checkpoint layout and 4-bit asymmetric group quantization.

For a linear layer with weight W [out, in] and group size g:
- q  = clamp(round(W / s) + z, 0, 15) per group of g input channels (one scale s and zero z per group and row);
- `qweight` int32 [in, out/8]: q transposed, each int32 holds 8 output columns, column AWQ_ORDER[i] of a block
  of 8 in bits 4i..4i+3;
- `qzeros`  int32 [in/g, out/8]: z packed the same way;
- `scales`  fp16  [in/g, out].
Dequantized weight: W' = (q - z) * s, which is what every AWQ kernel computes.
"""

from __future__ import annotations

import torch

BITS = 4
MAX_Q = (1 << BITS) - 1
PACK = 32 // BITS                       # values per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)    # nibble i holds column AWQ_ORDER[i] of each block of 8
SCALE_MIN = 1e-5


def _grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, z, s) as float32 [out, groups, g], [out, groups], [out, groups]; s already rounded to fp16."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of the group size {group_size}")
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = torch.aminmax(g, dim=2)
    s = ((hi - lo).clamp_(min=SCALE_MIN) / MAX_Q).half().float()
    z = (-lo / s).round_().clamp_(0, MAX_Q)
    q = (g / s.unsqueeze(2)).round_().add_(z.unsqueeze(2)).clamp_(0, MAX_Q)
    return q, z, s


def quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [out, in], z uint8 [out, in/g], s fp16 [out, in/g]) for W [out, in].

    The scale is rounded to fp16 before q is computed, so (q - z) * s in the stored fp16 is exactly the
    weight every loader reconstructs.
    """
    q, z, s = _grid(w, group_size)
    return q.reshape(w.shape).to(torch.uint8), z.to(torch.uint8), s.half()


def dequantize(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W' [out, in] = (q - z) * s from quantize()'s outputs."""
    out_f, in_f = q.shape
    groups = z.shape[1]
    d = (q.float().reshape(out_f, groups, -1) - z.float().unsqueeze(2)) * s.float().unsqueeze(2)
    return d.reshape(out_f, in_f).to(dtype)


def fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round-to-nearest with quantize()'s arithmetic, dequantized, in w's shape and dtype (for the searches)."""
    q, z, s = _grid(w, group_size)
    return q.sub_(z.unsqueeze(2)).mul_(s.unsqueeze(2)).reshape(w.shape).to(w.dtype)


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] from 4-bit values [rows, cols] in AWQ's nibble order."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"{cols} columns is not a multiple of {PACK}")
    v = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)]
    packed = torch.zeros(rows, cols // PACK, dtype=torch.int64, device=values.device)
    for i in range(PACK):
        packed |= v[:, :, i] << (BITS * i)
    # The top nibble reaches the int32 sign bit: wrap to two's complement explicitly (a signed int32 shift
    # that overflows is not defined the same way on every device).
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """4-bit values [rows, cols] (uint8) from pack_columns()' int32 [rows, cols/8]."""
    rows, n = packed.shape
    nibbles = torch.stack([(packed >> (BITS * i)) & MAX_Q for i in range(PACK)], dim=2)
    inverse = [AWQ_ORDER.index(c) for c in range(PACK)]
    return nibbles[:, :, inverse].reshape(rows, n * PACK).to(torch.uint8)


def pack_linear(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three stored tensors of one linear layer (suffixes qweight, qzeros, scales)."""
    return {
        "qweight": pack_columns(q.t().contiguous()),
        "qzeros": pack_columns(z.t().contiguous()),
        "scales": s.t().contiguous().half(),
    }


def unpack_linear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight [out, in] of a stored linear layer."""
    q = unpack_columns(qweight).t()
    z = unpack_columns(qzeros).t()
    return dequantize(q, z, scales.t(), dtype)
