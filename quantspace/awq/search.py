"""AWQ's two searches for one group of linears, on calibration activations.

Scale search: per input channel s = x̄^α / w̄^(1-α) (x̄ mean |activation|, w̄ mean group-normalised |weight|),
α on a grid in [0, 1); the α whose fake-quantized linears best reproduce the inspected module's output wins.
Clip search: per output row and group, shrink the max |weight| on a grid; keep the one with the least output
error of that group's partial dot products.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .pack import fake_quantize

Forward = Callable[[torch.Tensor], torch.Tensor]   # runs the inspected module over activations (chunked)


def mean_abs(x: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
    """Mean |x| per channel over all tokens, in float32 and chunks (no float32 copy of x)."""
    flat = x.reshape(-1, x.shape[-1])
    total = torch.zeros(flat.shape[1], dtype=torch.float32, device=x.device)
    for lo in range(0, flat.shape[0], chunk_rows):
        total += flat[lo:lo + chunk_rows].float().abs().sum(0)
    return total / flat.shape[0]


def weight_mean(linears: list[nn.Linear], group_size: int) -> torch.Tensor:
    """Per input channel mean of |w| / max |w| of its group, over all the linears' rows."""
    w = torch.cat([lin.weight.detach().float() for lin in linears], dim=0)
    g = w.abs().reshape(-1, group_size)
    g = g / g.amax(dim=1, keepdim=True).clamp(min=1e-8)
    return g.reshape(w.shape).mean(0)


def search_scale(linears: list[nn.Linear], x: torch.Tensor, forward: Forward, group_size: int,
                 n_grid: int = 20) -> torch.Tensor:
    """The best AWQ scales [in] for linears that all read x; their weights are left as they were."""
    x_mean = mean_abs(x)
    w_mean = weight_mean(linears, group_size)
    originals = [lin.weight.detach().clone() for lin in linears]   # a real copy: restored after the search
    with torch.no_grad():
        target = forward(x)
        best, best_loss = torch.ones_like(x_mean), float("inf")
        try:
            for step in range(n_grid):
                ratio = step / n_grid
                s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                for lin, w0 in zip(linears, originals):
                    scaled = w0.float() * s
                    lin.weight.copy_((fake_quantize(scaled, group_size) / s).to(w0.dtype))
                loss = (forward(x).float() - target.float()).pow(2).mean().item()
                if loss < best_loss:
                    best, best_loss = s.clone(), loss
        finally:
            for lin, w0 in zip(linears, originals):
                lin.weight.copy_(w0)
    return best


def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, max_elements: int = 1 << 26) -> torch.Tensor:
    """Best max |w| per (output row, group), shape [out, in/g], from n_tokens of the linear's input x.

    The error of a group's partial outputs over the tokens, mean_t (x_t · d)², equals d · C · d with
    C = mean_t x_t x_tᵀ of that group, so it costs g² per row and group instead of one product per token.
    """
    out_f, in_f = weight.shape
    groups = in_f // group_size
    flat = x.reshape(-1, in_f)
    step = max(1, flat.shape[0] // n_tokens)
    xs = flat[::step][:n_tokens].float().reshape(-1, groups, group_size).transpose(0, 1)   # [groups, tokens, g]
    cov = torch.bmm(xs.transpose(1, 2), xs) / xs.shape[1]                                 # [groups, g, g]
    w = weight.float().reshape(out_f, groups, group_size)
    best = torch.empty(out_f, groups, device=weight.device)
    rows = max(1, max_elements // in_f)
    for lo in range(0, out_f, rows):
        wb = w[lo:lo + rows]                                            # [rows, groups, g]
        org_max = wb.abs().amax(dim=2)                                  # [rows, groups]
        best_err = torch.full_like(org_max, float("inf"))
        best_max = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(wb, max_val.unsqueeze(2)), -max_val.unsqueeze(2))
            d = (fake_quantize(clipped.reshape(-1, in_f), group_size).reshape(wb.shape) - wb).transpose(0, 1)
            err = (torch.bmm(d, cov) * d).sum(dim=2).t()                # [rows, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        best[lo:lo + rows] = best_max
    return best


def apply_clip(lin: nn.Linear, max_val: torch.Tensor) -> None:
    out_f, groups = max_val.shape
    w = lin.weight.data.reshape(out_f, groups, -1)
    m = max_val.unsqueeze(2).to(w.dtype)
    w.copy_(torch.maximum(torch.minimum(w, m), -m))


def fold_scale(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide s out of what produces the input (norm weight, or a linear's last rows) and into the modules that
    read it (their weight's input columns).

    A norm computing (offset + w) · x̂ gets w' = (offset + w) / s − offset, so that offset + w' = (offset + w) / s.
    """
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            n = s.numel()
            prev.weight[-n:].div_(s.view(-1, 1).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias[-n:].div_(s.to(prev.bias.dtype))
        else:   # RMSNorm / LayerNorm: y = (offset + w) * norm(x) (+ b)
            w = prev.weight
            w.copy_(((w.float() + norm_offset) / s.float() - norm_offset).to(w.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        for lin in linears:
            lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))
