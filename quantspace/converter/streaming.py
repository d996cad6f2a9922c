"""HF folder (config + tokenizer + safetensors) → one GGUF file, streamed tensor by tensor."""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from ..archs import GGUFSpec, arch_of, load_config
from ..errors import CorruptWeightsError, MissingFileError, UnsupportedArchitectureError
from .vocab import load_vocab
from ..weights import TensorEntry, all_entries, read_converted

ROPE_SCALINGS = (None, "default", "linear", "llama3")
OUT_TYPES = {"F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
             "F32": gguf.LlamaFileType.ALL_F32}

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class HParams:
    n_layer: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HParams":
        try:
            n_head = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            rope = config.get("rope_parameters") or {}
            scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            hp = cls(
                n_layer=int(config["num_hidden_layers"]),
                hidden=hidden,
                ffn=int(config["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(config.get("num_key_value_heads") or n_head),
                head_dim=int(config.get("head_dim") or hidden // n_head),
                n_ctx=int(config.get("max_position_embeddings") or 4096),
                rms_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=scaling,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MissingFileError(f"config.json lacks a usable value for {exc}; is this a causal LM config?") from None
        if hp.rope_kind not in ROPE_SCALINGS:
            raise UnsupportedArchitectureError(
                f"RoPE scaling '{hp.rope_kind}' is not supported yet (supported: linear, llama3)."
            )
        return hp

    @property
    def rope_kind(self) -> str | None:
        """The RoPE scaling type; configs name it `rope_type` (newer) or `type` (older)."""
        s = self.rope_scaling or {}
        return s.get("rope_type", s.get("type"))



def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half RoPE layout to llama.cpp's interleaved pairs, per head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hp: HParams) -> np.ndarray | None:
    """Per-frequency divisors of the llama3 RoPE scaling, the form llama.cpp reads from rope_freqs."""
    if hp.rope_kind != "llama3":
        return None
    s = hp.rope_scaling or {}
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write_hparams(w: gguf.GGUFWriter, hp: HParams, n_vocab: int, name: str, ftype: int) -> None:
    w.add_name(name)
    w.add_vocab_size(n_vocab)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.hidden)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.ffn)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_head != hp.hidden:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_file_type(ftype)
    if hp.rope_kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float((hp.rope_scaling or {})["factor"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass(frozen=True)
class _Planned:
    entry: TensorEntry | None     # None for tensors we synthesise (rope_freqs)...
    name: str                     # GGUF name
    shape: tuple[int, ...]
    out: str                      # "F32", "F16" or "BF16"
    permute_heads: int = 0
    data: np.ndarray | None = None  # ...whose data is then here

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.out == "F32" else 2)


def plan(entries: list[TensorEntry], spec: GGUFSpec, hp: HParams, out_type: str) -> list[_Planned]:
    """Every GGUF tensor the converter writes: name, shape and type (the size estimate reads it too)."""
    names = gguf.get_tensor_name_map(spec.gguf_arch, hp.n_layer)
    planned = []
    for e in entries:
        if e.name.endswith(spec.skip_suffixes):
            continue
        mapped = names.get_name(e.name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise CorruptWeightsError(f"Tensor {e.name} has no place in a {spec.gguf_name} GGUF; unexpected checkpoint.")
        heads = 0
        if spec.permute_qk and e.name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = hp.n_head
        elif spec.permute_qk and e.name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = hp.n_head_kv
        # Norms and biases are tiny and precision-sensitive: llama.cpp keeps them in F32.
        out = "F32" if len(e.shape) == 1 or out_type == "F32" else out_type
        planned.append(_Planned(e, mapped, e.shape, out, heads))
    factors = llama3_rope_factors(hp)
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(_Planned(None, name, factors.shape, "F32", data=factors))
    return planned


def _materialise(p: _Planned) -> np.ndarray:
    if p.entry is None:
        assert p.data is not None
        return p.data
    order = permute_rows(np.arange(p.shape[0]), p.permute_heads) if p.permute_heads else None
    return read_converted(p.entry, p.out, row_order=order)


def convert(model_dir: Path, out_path: Path, *, out_type: str = "F16", name: str | None = None,
            progress: ProgressFn | None = None) -> Path:
    """Write `out_path` (atomically) from an HF model folder. Returns the path."""
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {sorted(OUT_TYPES)}")
    config = load_config(model_dir)
    _, spec = arch_of(config)
    hp = HParams.from_config(config)
    entries = all_entries(model_dir)
    planned = plan(entries, spec, hp, out_type)
    embed = next((p for p in planned if p.name == "token_embd.weight"), None)
    if embed is None:
        raise CorruptWeightsError("The checkpoint has no token embedding tensor; it is incomplete.")
    vocab = load_vocab(model_dir, n_vocab=embed.shape[0])

    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, spec.gguf_name)
    try:
        _write_hparams(writer, hp, len(vocab.tokens), name or model_dir.name, int(OUT_TYPES[out_type]))
        vocab.write(writer)
        for p in planned:
            dtype = np.uint16 if p.out == "BF16" else np.dtype(np.float16 if p.out == "F16" else np.float32)
            raw = gguf.GGMLQuantizationType.BF16 if p.out == "BF16" else None
            writer.add_tensor_info(p.name, p.shape, dtype, p.nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total, done = sum(p.nbytes for p in planned), 0
        for p in planned:
            writer.write_tensor_data(_materialise(p))
            done += p.nbytes
            if progress:
                progress(done, total)
        writer.close()
        os.replace(tmp, out_path)
    except OSError as exc:
        named = _with_errno(exc, tmp)   # before the partial file goes: its size tells which limit was hit
        _discard(writer, tmp)
        if named is exc:
            raise
        raise named from None
    except BaseException:
        _discard(writer, tmp)
        raise
    return out_path


def _discard(writer: gguf.GGUFWriter, tmp: Path) -> None:
    try:
        writer.close()   # flushing may fail again (a full disk): the partial file goes regardless
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _with_errno(exc: OSError, path: Path) -> OSError:
    """numpy's tofile reports a short write without an errno ("N requested and M written"): that is the disk
    refusing more bytes, either full (ENOSPC) or past this process's file-size limit (EFBIG)."""
    if exc.errno is not None or "requested and" not in str(exc):
        return exc
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    code = errno.EFBIG if limit != resource.RLIM_INFINITY and size >= limit - (1 << 20) else errno.ENOSPC
    return OSError(code, os.strerror(code), str(path))

