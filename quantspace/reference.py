"""The source model's evaluation logits, one decoder layer at a time, in bounded memory.

Loading the whole source in float32 takes 4 bytes per parameter (32 GB for an 8B model). Here the model is the
AWQ engine's meta-device skeleton, and the hidden states of every evaluation chunk walk through it one decoder
layer at a time: each layer is read from the safetensors files into float32, run over all chunks, and dropped.
After the last layer come the final norm and the output head (the tied embedding when the config ties them),
applied to the scored positions only and read in blocks of rows, so the head is never whole in float32 either.

Weights are read with plain file reads (no mmap): a memory-mapped file's pages would stay resident in the process
while the walk goes on, and the point of the walk is that they do not.

On ZeroGPU the walk runs in GPU windows (GpuWindows): each window loads the chunks' hidden states, runs the
layers its time allows and saves them back; the embeddings and the head stay on the CPU in this process.

The numbers are those of the whole-model path (quantspace.evaluate) within float32 rounding: same float32 weights,
same attention (SDPA, causal, each layer's sliding window), same head.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import BadOptionError, CorruptWeightsError, QuantizeError, TokenizerError, UnsupportedArchitectureError
from .weights import ITEMSIZE, TORCH_DTYPES, TensorEntry, all_entries, read_raw, read_tensor

FP32 = 4
# Tokens per forward pass through a layer (whole chunks; at least one): bounds the layer's own activations.
SLICE_TOKENS = 2048
# float32 bytes of output-head (or embedding) rows read at once, and of the logits one block of rows makes.
HEAD_BLOCK_BYTES = 32 * 1024 * 1024
# float32 bytes of scored logits computed together (at least one chunk's), before they are handed on.
LOGITS_BYTES = 128 * 1024 * 1024


def streamable(config: dict[str, Any]) -> bool:
    """Whether the source can be evaluated layer by layer: a text-only model of a family with a layer table."""
    from .awq.layers import spec_for
    from .multimodal import is_multimodal

    if is_multimodal(config) or config.get("use_bidirectional_attention"):
        return False
    try:
        spec_for(config)
    except UnsupportedArchitectureError:
        return False
    return True


# --------------------------------------------------------------------------- weights


class SourceWeights:
    """Named tensors of a model folder's safetensors files, read as float32 (whole, or a range of rows).

    The walk asks only for these; a subclass may hand out other weights under the same names (the AWQ
    checkpoint's, dequantized; the source's, rounded to nearest) and the walk measures those instead."""

    def __init__(self, model_dir: Path):
        self.entries: dict[str, TensorEntry] = {e.name: e for e in all_entries(model_dir)}

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise CorruptWeightsError(f"Tensor {name} is missing from the model's safetensors files.")
        return self.entries[name]

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        e = self.entry(name)
        return self.rows(name, 0, e.shape[0], device) if e.shape else self._read(e, e.start, e.nbytes).reshape(())

    def rows(self, name: str, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        e = self.entry(name)
        row_bytes = e.nbytes // e.shape[0]
        block = self._read(e, e.start + lo * row_bytes, (hi - lo) * row_bytes)
        return block.view(hi - lo, *e.shape[1:]).to(device, torch.float32)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as the file stores it (any dtype, integers too), on the CPU."""
        return read_tensor(self.entry(name))

    @staticmethod
    def _read(e: TensorEntry, start: int, nbytes: int) -> torch.Tensor:
        if e.dtype not in ITEMSIZE:
            raise CorruptWeightsError(f"Tensor {e.name} has dtype {e.dtype}, which is not a float type we read.")
        buf = read_raw(e, start, nbytes)
        return torch.frombuffer(buf, dtype=getattr(torch, TORCH_DTYPES[e.dtype])) if nbytes else torch.empty(0)


def _row_blocks(n_rows: int, row_floats: int) -> Iterator[tuple[int, int]]:
    """Ranges of rows of about HEAD_BLOCK_BYTES in float32 (row_floats: the larger of a row's width and the
    number of outputs each row makes)."""
    step = max(1, HEAD_BLOCK_BYTES // (FP32 * max(1, row_floats)))
    for lo in range(0, n_rows, step):
        yield lo, min(n_rows, lo + step)


# --------------------------------------------------------------------------- the walk


@dataclass(frozen=True)
class GpuWindows:
    """The walk in GPU windows (ZeroGPU): `run(fn, *args)` calls fn in a window, where about budget_s of layers
    run; the chunks' hidden states wait in a folder under workdir between windows."""
    run: Callable[..., Any]
    budget_s: float
    workdir: Path


def chunk_logits(model_dir: Path, chunks: list[list[int]], ctx: int, first_scored: int, scored: int,
                 device: str = "cpu", weights: SourceWeights | None = None,
                 on_layer: Callable[[int, int], None] | None = None,
                 windows: GpuWindows | None = None) -> Iterator[np.ndarray]:
    """float32 logits of each chunk's scored positions (rows first_scored .. first_scored+scored-1), shape
    (scored, vocab), in chunk order; each array is valid until the next is asked for (copy it to keep it).
    Every layer runs before the first chunk's logits come; on_layer(done, layers) is called as they finish.
    `weights` (default: model_dir's own) supplies the tensors; the architecture is model_dir's config.json.
    With `windows`, the layers run in GPU windows on `device` and the rest (embeddings, head) here on the CPU."""
    model, spec = _skeleton(model_dir)
    weights = SourceWeights(model_dir) if weights is None else weights
    tokens = torch.tensor(chunks, dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape[1] != ctx:
        raise ValueError(f"expected chunks of {ctx} tokens")
    dev = torch.device("cpu") if windows else _device(device)
    cfg = model.config
    with _exact():
        x = _embed(weights, spec, cfg, tokens, dev)
    if windows is None:
        with _exact():
            _walk(model, spec, weights, x, 0, dev, None, on_layer)
    else:
        n_layers = len(model.get_submodule(spec.layers_path))
        x = _walk_in_windows(model_dir, weights, x, device, windows, n_layers, on_layer)
    base = spec.layers_path.rpartition(".")[0]
    with _exact():
        norm = _materialise(model.get_submodule(f"{base}.norm"), f"{base}.norm.", None, weights, dev)
        hidden = norm(x[:, first_scored:first_scored + scored])
        del x
    yield from _head(weights, spec, cfg, hidden, dev)


def _skeleton(model_dir: Path) -> tuple[nn.Module, Any]:
    """The source's meta-device skeleton (the AWQ engine's) and its layer table."""
    from .archs import load_config
    from .awq import engine
    from .awq.layers import spec_for

    config = load_config(model_dir)
    spec = spec_for(config)
    return engine._skeleton(config, spec), spec


def _walk(model: nn.Module, spec: Any, weights: SourceWeights, x: torch.Tensor, first: int, dev: torch.device,
          budget_s: float | None, on_layer: Callable[[int, int], None] | None) -> int:
    """Run the skeleton's decoder layers from `first` over the chunks' hidden states x [chunks, ctx, hidden] in
    place; the index of the next layer to run (all of them, unless the next would not finish within budget_s)."""
    from .awq import engine

    start = time.monotonic()
    cfg, ctx = model.config, x.shape[1]
    pe_of = engine._position_embeddings(model, spec, x, ctx)
    layers = model.get_submodule(spec.layers_path)
    per_slice = max(1, SLICE_TOKENS // ctx)
    slowest = 0.0
    for i in range(first, len(layers)):
        if budget_s is not None and i > first and time.monotonic() - start + 1.2 * slowest > budget_s:
            return i
        t0 = time.monotonic()
        layer = _materialise(layers[i], f"{spec.layers_path}.{i}.", spec, weights, dev)
        mask = _mask(cfg, i, ctx, dev)
        pe = pe_of(i)
        for lo in range(0, len(x), per_slice):   # chunks are independent: each slice is replaced in place
            y = layer(x[lo:lo + per_slice], position_embeddings=pe, attention_mask=mask)
            x[lo:lo + per_slice] = y[0] if isinstance(y, tuple) else y
            del y
        layers[i] = layer.to("meta")
        del layer
        _trim()
        slowest = max(slowest, time.monotonic() - t0)
        if on_layer is not None:
            on_layer(i + 1, len(layers))
    return len(layers)


def _walk_in_windows(model_dir: Path, weights: SourceWeights, x: torch.Tensor, device: str, windows: GpuWindows,
                     n_layers: int, on_layer: Callable[[int, int], None] | None) -> torch.Tensor:
    """The walk as a series of GPU windows, each resuming from the hidden states the last one saved."""
    import shutil
    import tempfile

    windows.workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="reference-walk-", dir=windows.workdir))
    try:
        torch.save(x, folder / "hidden.pt")
        del x
        done = 0
        while done < n_layers:
            reached = windows.run(walk_window, model_dir, weights, str(folder), done, device, windows.budget_s)
            if reached <= done:
                raise QuantizeError(f"The evaluation made no progress at layer {done}; the GPU window is too short.")
            done = reached
            if on_layer is not None:
                on_layer(done, n_layers)
        return torch.load(folder / "hidden.pt")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def walk_window(model_dir: Path, weights: SourceWeights, folder: str, first: int, device: str,
                budget_s: float) -> int:
    """One GPU window's share of the walk: the saved hidden states through layers from `first` on `device`
    for about budget_s, saved back; the next layer's index. Top-level with plain arguments, so a ZeroGPU runner
    can call it in its worker process."""
    dev = _device(device)
    path = Path(folder) / "hidden.pt"
    x = torch.load(path, map_location=dev)
    model, spec = _skeleton(model_dir)
    with _exact():
        reached = _walk(model, spec, weights, x, first, dev, budget_s, None)
    tmp = path.with_suffix(".tmp")
    torch.save(x.cpu(), tmp)
    os.replace(tmp, path)
    return reached


@contextmanager
def _exact() -> Iterator[None]:
    """No autograd, and float32 matrix products in full float32 (no TF32 on a GPU, whatever the caller set);
    entered around computations only, never across a yield (both settings are per thread, not per generator)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _trim() -> None:
    """Hand the dropped layer's memory back to the OS: glibc keeps freed blocks below its (self-raising) mmap
    threshold in the heap, where layer after layer of differently sized blocks would add up."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):   # not glibc (e.g. musl): nothing to do
            pass


def _device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadOptionError("The source was to be evaluated on CUDA, but no CUDA GPU is visible to torch.")
    if dev.type not in ("cpu", "cuda"):
        raise BadOptionError(f"The source is evaluated on cpu or cuda, not {device}.")
    return dev


def _materialise(module: nn.Module, prefix: str, spec: Any, weights: SourceWeights, dev: torch.device) -> nn.Module:
    """The meta-device module with its float32 tensors read from the source, on the device."""
    stored = spec.stored if spec is not None else (lambda n: n)
    state = {name: weights.get(prefix + stored(name), dev) for name in module.state_dict()}
    module.load_state_dict(state, assign=True)
    return module


def _embed(weights: SourceWeights, spec: Any, cfg: Any, tokens: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """The chunks' float32 embeddings [chunks, ctx, hidden], the table read in row blocks (Gemma: × √hidden in
    float32, as transformers does on a float32 model)."""
    e = weights.entry(spec.embeddings)
    n_rows, width = e.shape
    if int(tokens.max()) >= n_rows or int(tokens.min()) < 0:
        raise TokenizerError(f"A token id of the evaluation text is outside the model's {n_rows} embedding rows; "
                             "the tokenizer does not belong to these weights.")
    x = torch.empty(*tokens.shape, width, dtype=torch.float32, device=dev)
    ids = tokens.to(dev)
    for lo, hi in _row_blocks(n_rows, width):
        where = (ids >= lo) & (ids < hi)
        if bool(where.any()):
            x[where] = weights.rows(spec.embeddings, lo, hi, dev)[ids[where] - lo]
    if spec.scaled_embeddings:
        x *= torch.tensor(float(cfg.hidden_size) ** 0.5, dtype=torch.float32)
    return x


def _window(cfg: Any, i: int) -> int | None:
    """Layer i's sliding window as transformers masks it: per layer type where the config lists them, else the
    config's sliding_window for every layer (Mistral, Mixtral, Phi-3, Qwen3-MoE); None for full attention."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        return window if types[i] == "sliding_attention" else None
    return window


def _mask(cfg: Any, i: int, ctx: int, dev: torch.device) -> torch.Tensor | None:
    """None (SDPA's own causal mask) unless the layer's window is shorter than the chunk: then a boolean
    [1, 1, ctx, ctx] mask, True where query q may see key k (k <= q and q - k < window)."""
    window = _window(cfg, i)
    if window is None or window >= ctx:
        return None
    q = torch.arange(ctx, device=dev).unsqueeze(1)
    k = torch.arange(ctx, device=dev).unsqueeze(0)
    return ((k <= q) & (q - k < window))[None, None]


def _head(weights: SourceWeights, spec: Any, cfg: Any, hidden: torch.Tensor, dev: torch.device) -> Iterator[np.ndarray]:
    """Logits of the scored positions, chunks in groups of about LOGITS_BYTES, head rows in blocks."""
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    name = spec.embeddings if tied else "lm_head.weight"
    bias = None if tied or "lm_head.bias" not in weights.entries else "lm_head.bias"
    vocab = int(cfg.vocab_size)
    n_rows = weights.entry(name).shape[0]
    if n_rows < vocab:
        raise CorruptWeightsError(f"{name} has {n_rows} rows but config.json gives a vocabulary of {vocab}.")
    cap = getattr(cfg, "final_logit_softcapping", None)
    n_chunks, scored, _ = hidden.shape
    group = max(1, LOGITS_BYTES // (FP32 * scored * vocab))
    # One buffer for every group: each chunk's array is a view of it, valid until the next chunk is asked for
    # (as llama.cpp's logits in evaluate._LlamaRunner); the consumer is done with a chunk before the next.
    out = torch.empty(min(group, n_chunks), scored, vocab, dtype=torch.float32, device=dev)
    for g in range(0, n_chunks, group):
        h = hidden[g:g + group]
        logits = out[:len(h)]
        with _exact():
            for lo, hi in _row_blocks(vocab, max(hidden.shape[-1], len(h) * scored)):
                b = weights.rows(bias, lo, hi, dev) if bias else None
                logits[..., lo:hi] = nn.functional.linear(h, weights.rows(name, lo, hi, dev), b)
            if cap is not None:   # Gemma-style final soft-capping, as the CausalLM's forward applies it
                logits.div_(cap).tanh_().mul_(cap)
            arrays = [rows.cpu().numpy() for rows in logits]   # views on the CPU; copies from a GPU
        yield from arrays


# --------------------------------------------------------------------------- memory estimate


def layer_bytes(config: dict[str, Any]) -> int:
    """float32 bytes of the largest decoder layer, from config.json (every layer has the same size here)."""
    return FP32 * _layer_shape(config)[0]


def memory_needed(config: dict[str, Any], ctx: int = 512, max_chunks: int = 16) -> int:
    """Bytes the layer-by-layer reference needs, from config.json: the largest decoder layer in float32, the
    chunks' hidden states and one slice's activations inside a layer, a block of head rows and the logits
    computed together (plus the whole-vocabulary work of turning one chunk into log-probabilities)."""
    from .multimodal import text_config

    c = text_config(config)
    params, ffn_width = _layer_shape(config)
    hidden, heads = int(c["hidden_size"]), int(c.get("num_attention_heads") or 1)
    vocab = int(c.get("vocab_size") or 0)
    chunks_per_slice = min(max_chunks, max(1, SLICE_TOKENS // ctx))
    slice_tokens = chunks_per_slice * ctx
    activations = FP32 * (max_chunks * ctx * hidden                       # the hidden states of every chunk
                          + slice_tokens * (4 * ffn_width + 6 * hidden)   # inside one slice: the MLP, q/k/v/out
                          + chunks_per_slice * heads * ctx * ctx)         # attention scores
    scored = ctx - 1 - ctx // 2
    per_chunk = FP32 * scored * vocab
    group = min(max_chunks, max(1, LOGITS_BYTES // max(1, per_chunk)))
    rows = min(HEAD_BLOCK_BYTES, FP32 * vocab * hidden)                  # a block of head rows
    block_logits = min(HEAD_BLOCK_BYTES, per_chunk * group)              # the logits that block makes
    # + the logits computed together and one chunk's log-probabilities (evaluate.reference_from_logits)
    head = rows + block_logits + per_chunk * group + 2 * per_chunk
    return int(FP32 * params + activations + head)


def _layer_shape(config: dict[str, Any]) -> tuple[int, int]:
    """(parameters of one decoder layer, width of the MLP activations a token makes)."""
    from .multimodal import text_config

    c = text_config(config)
    hidden = int(c["hidden_size"])
    heads = int(c.get("num_attention_heads") or 1)
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    ffn = int(c.get("intermediate_size") or 4 * hidden)
    experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    if experts:
        expert_ffn = int(c.get("moe_intermediate_size") or ffn)
        shared = int(c.get("shared_expert_intermediate_size") or 0)
        mlp = 3 * hidden * (experts * expert_ffn + shared) + hidden * experts   # + the router
        ffn = expert_ffn * int(c.get("num_experts_per_tok") or 1) + shared
    else:
        mlp = 3 * hidden * ffn
    return attention + mlp + 4 * hidden, ffn   # + norms (and Qwen3's q/k norms, roughly)
