"""--fit: the GGUF with the least measured error that fits a size budget.

Each weight is quantized by llama.cpp itself to every type of a ladder (Q2_K … Q8_0), with the run's importance
matrix; its sensitivity to a type is the imatrix-weighted squared error of that result,
Σ_cols imatrix[col] · Σ_rows (W − Ŵ)², read back from the files. Starting from every weight at its smallest type,
a greedy pass buys the upgrade with the most error removed per added byte until the budget is spent. The file is
then written by llama.cpp with one `^name$=TYPE` override per weight, so its bytes are those that were measured.

A budget is a size ("4.5GB") or a device ("8GB-GPU-8k", "16 GB Mac, 8k context"): the memory the runtime can give
the model, less its KV cache for that context and llama.cpp's working buffers, is what the file may take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import gguf
import numpy as np

from .errors import BadOptionError
from .multimodal import text_config
from .report import format_size

if TYPE_CHECKING:
    from .imatrix import Imatrix

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# The candidate types, smallest first, and the llama.cpp file type each candidate file is made with.
LADDER: tuple[tuple[Q, F], ...] = (
    (Q.Q2_K, F.MOSTLY_Q2_K), (Q.Q3_K, F.MOSTLY_Q3_K_M), (Q.Q4_K, F.MOSTLY_Q4_K_M),
    (Q.Q5_K, F.MOSTLY_Q5_K_M), (Q.Q6_K, F.MOSTLY_Q6_K), (Q.Q8_0, F.MOSTLY_Q8_0),
)
UNITS = {"B": 1, "KB": 1_000, "MB": 1_000_000, "GB": 1_000_000_000, "TB": 1_000_000_000_000}
BUDGET = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)B?\s*", re.I)   # '4.5GB', '800 MB', '4.5G'
PADDING = 32   # GGUF's default alignment: each tensor may start up to this many bytes later than planned


# A device: its memory in GB as sold (GPUs and Macs are sold in GiB), GPU or Mac, and the context in k tokens.
DEVICE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*GB?\s*[-_ ]?\s*(GPU|Mac)\s*[,;_ -]?\s*([0-9]+)\s*k(?:\s*context)?\s*",
                    re.I)
PRESETS = ("8GB-GPU-8k", "12GB-GPU-16k", "16GB-GPU-16k", "24GB-GPU-32k", "16GB-Mac-8k", "32GB-Mac-16k")
GIB = 1 << 30
GPU_RESERVE = GIB // 2       # CUDA context, cuBLAS workspace and the desktop's share of the card
MAC_SHARE = (2 / 3, 3 / 4)   # macOS lets the GPU use about 2/3 of unified memory up to 36 GB, 3/4 above
UBATCH = 512                 # llama.cpp's default micro-batch: its working buffers scale with it
NOT_A_BUDGET = "give a size such as 4.5GB or 800MB, or a device such as 8GB-GPU-8k or 16GB-Mac-8k"


@dataclass(frozen=True)
class Device:
    memory_gb: float
    kind: str      # "GPU" or "Mac"
    ctx: int       # tokens of context the KV cache is kept for

    @property
    def name(self) -> str:
        return f"{self.memory_gb:g}GB-{self.kind}-{self.ctx // 1024}k"

    def usable(self) -> int:
        """Bytes of memory the runtime can give llama.cpp on this device."""
        total = self.memory_gb * GIB
        if self.kind == "Mac":
            return int(total * MAC_SHARE[self.memory_gb > 36])
        return max(0, int(total) - GPU_RESERVE)


def device_of(text: str) -> Device | None:
    m = DEVICE.fullmatch(str(text))
    if not m or float(m.group(1)) <= 0 or int(m.group(3)) <= 0:
        return None
    kind = "GPU" if m.group(2).upper() == "GPU" else "Mac"
    return Device(float(m.group(1)), kind, int(m.group(3)) * 1024)


def check_budget(text: str) -> None:
    """BadOptionError unless `text` is a size or a device."""
    if device_of(text) is None:
        parse_budget(text)


def parse_budget(text: str) -> int:
    """'4.5GB', '4.5 GB', '800MB', '4.5G' → bytes (decimal units, as the Hub shows sizes)."""
    m = BUDGET.fullmatch(str(text))
    if not m or float(m.group(1)) <= 0:
        raise BadOptionError(f"fit '{str(text).strip()}' is not a size or a device: {NOT_A_BUDGET}.")
    return int(float(m.group(1)) * UNITS[(m.group(2).upper() + "B") if m.group(2) else "B"])


def budget_label(text: str) -> str:
    """The budget as written in the file name: 'FIT-4.5GB', 'FIT-8GB-GPU-8k'."""
    device = device_of(text)
    if device is not None:
        return f"FIT-{device.name}"
    m = BUDGET.fullmatch(str(text))
    assert m, text
    return f"FIT-{float(m.group(1)):g}{m.group(2).upper()}B"


def kv_cache_bytes(config: dict[str, Any], ctx: int) -> int:
    """llama.cpp's F16 KV cache for `ctx` tokens: every full-attention layer keeps them all, a sliding-window layer
    its window plus a micro-batch (as llama-server keeps it; --swa-full keeps all), a linear-attention or
    recurrent layer no per-token cache. llama.cpp allocates cells in multiples of 256."""
    text = text_config(config)
    layers = int(text.get("num_hidden_layers") or 0)
    heads = int(text.get("num_attention_heads") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text.get("hidden_size") or 0) // heads)
    window = int(text.get("sliding_window") or 0)
    kinds = list(text.get("layer_types") or ["full_attention"] * layers)
    full = _cells(ctx)
    tokens = 0
    for kind in kinds:
        if kind == "full_attention":
            tokens += full
        elif kind in ("sliding_attention", "chunked_attention") and window:
            tokens += min(full, _cells(window + UBATCH))
        elif "attention" in kind and "linear" not in kind:
            tokens += full   # an attention kind we do not know: the whole context, to be safe
    return tokens * 2 * kv_heads * head_dim * 2   # K and V, 2 bytes each


def _cells(tokens: int) -> int:
    return -(-tokens // 256) * 256


def working_bytes(config: dict[str, Any]) -> int:
    """llama.cpp's compute buffers for one micro-batch: the logits and the widest activations, in float32."""
    text = text_config(config)
    widest = max(int(text.get("intermediate_size") or 0), int(text.get("hidden_size") or 0))
    return UBATCH * (int(text.get("vocab_size") or 0) + 4 * widest) * 4


def file_budget(text: str, config: dict[str, Any]) -> tuple[int, str]:
    """The bytes the fitted file may take, and how they were reckoned (for the report and the card).
    BadOptionError when the device has no room left for any file."""
    device = device_of(text)
    if device is None:
        budget = parse_budget(text)
        return budget, f"a budget of {format_size(budget)}"
    usable, kv, work = device.usable(), kv_cache_bytes(config, device.ctx), working_bytes(config)
    how = (f"{device.name}: {format_size(usable)} the runtime can use, less {format_size(kv)} of KV cache for "
           f"{device.ctx} tokens and {format_size(work)} of working buffers")
    if usable - kv - work <= 0:
        raise BadOptionError(f"fit {device.name}: {how} leaves no room for the model; pick a shorter context or a "
                             "larger device. Nothing was written.")
    return usable - kv - work, how


@dataclass(frozen=True)
class Choice:
    qtype: Q
    nbytes: int
    error: float


@dataclass
class Plan:
    """The per-tensor types chosen, and what they are expected to cost."""
    types: dict[str, Q]          # GGUF tensor name → type
    expected_bytes: int
    error: float                 # Σ imatrix-weighted squared error of the chosen types
    smallest_bytes: int          # the file with every weight at its smallest candidate type

    def overrides(self) -> tuple[tuple[str, Q], ...]:
        return tuple((f"^{re.escape(name)}$", t) for name, t in self.types.items())

    def recipe(self) -> dict[str, str]:
        return {name: t.name for name, t in self.types.items()}


def _weights(imatrix: "Imatrix | None", name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The imatrix of one weight, shaped to broadcast over it ([experts, 1, cols]), or None (all ones)."""
    if imatrix is None or name not in imatrix.entries:
        return None
    values = imatrix.entries[name].values()
    lead = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    if values.size != lead * shape[-1]:
        return None
    return values.reshape(*shape[:-2], 1, shape[-1]) if len(shape) > 2 else values.reshape(1, shape[-1])


def _error(ref: np.ndarray, got: np.ndarray, w: np.ndarray | None) -> float:
    diff = (ref - got).astype(np.float64) ** 2
    return float((diff * w).sum() if w is not None else diff.sum())


def measure_candidate(f16: Path, candidate: Path, imatrix: "Imatrix | None",
                      tick: Callable[[int, int], None] | None = None) -> Candidate:
    """Each weight's bytes and imatrix-weighted error in one candidate file (read, then no longer needed)."""
    base = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    got = {t.name: t for t in gguf.GGUFReader(candidate).tensors}
    header = candidate.stat().st_size - sum(int(t.n_bytes) for t in got.values())
    choices: dict[str, Choice] = {}
    for i, (name, t) in enumerate(base.items()):
        c, q = got[name], Q(got[name].tensor_type)
        if q == Q(t.tensor_type):   # left as it was (a norm, a router...): no error, only bytes
            choices[name] = Choice(q, int(c.n_bytes), 0.0)
        else:
            ref = gguf.quants.dequantize(t.data, Q(t.tensor_type))
            w = _weights(imatrix, name, ref.shape)
            choices[name] = Choice(q, int(c.n_bytes), _error(ref, gguf.quants.dequantize(c.data, q), w))
        if tick:
            tick(i + 1, len(base))
    return Candidate(header, choices)


@dataclass(frozen=True)
class Candidate:
    header: int                    # bytes of everything but the tensors
    choices: dict[str, Choice]     # GGUF tensor name → its type, bytes and error in this file


def ladders(f16: Path, candidates: list[Candidate]) -> tuple[dict[str, list[Choice]], int]:
    """Per weight, its choices across the candidate files (dominated ones dropped, smallest first), and the bytes of
    everything else (header, metadata, tensors no candidate changes)."""
    base = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(f16).tensors}
    fixed = candidates[0].header
    options: dict[str, list[Choice]] = {}
    for name, base_type in base.items():
        seen = [c.choices[name] for c in candidates]
        if {c.qtype for c in seen} == {base_type}:   # never quantized: a fixed cost
            fixed += seen[0].nbytes
            continue
        found: dict[Q, Choice] = {}
        for c in seen:
            found.setdefault(c.qtype, c)   # llama.cpp fell back to the same type for two candidates
        ladder: list[Choice] = []
        for c in sorted(found.values(), key=lambda c: (c.nbytes, c.error)):
            if not ladder or c.error < ladder[-1].error:   # more bytes must buy less error
                ladder.append(c)
        options[name] = ladder
    return options, fixed


def too_small(fit: str, smallest: int, budget: int) -> BadOptionError:
    return BadOptionError(f"fit {fit.strip()}: the smallest file this model can be is {format_size(smallest)} (every "
                          f"weight at its smallest type, {LADDER[0][0].name} where its rows allow), over the "
                          f"{format_size(budget)} the budget leaves for it; give a larger budget. Nothing was written.")


def choose(options: dict[str, list[Choice]], fixed: int, budget: int, label: str) -> Plan:
    """Greedy: every weight at its smallest choice, then the upgrade with the most error removed per added byte,
    while the file fits. BadOptionError when even the smallest file does not fit."""
    margin = PADDING * len(options)
    at = {name: 0 for name in options}
    size = fixed + margin + sum(o[0].nbytes for o in options.values())
    smallest = size
    if size > budget:
        raise too_small(label, smallest, budget)
    while True:
        best: tuple[float, str, int] | None = None
        for name, ladder in options.items():
            i = at[name]
            for j in range(i + 1, len(ladder)):
                added = ladder[j].nbytes - ladder[i].nbytes
                if size + added > budget:
                    break
                gain = (ladder[i].error - ladder[j].error) / added
                if best is None or gain > best[0]:
                    best = (gain, name, j)
        if best is None:
            break
        _, name, j = best
        size += options[name][j].nbytes - options[name][at[name]].nbytes
        at[name] = j
    types = {name: options[name][i].qtype for name, i in at.items()}
    error = sum(options[name][i].error for name, i in at.items())
    return Plan(types, size - margin, error, smallest - margin)
