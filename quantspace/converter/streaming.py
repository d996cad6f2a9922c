"""HF folder (config + tokenizer + safetensors) → one GGUF file, streamed tensor by tensor."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from ..archs import GGUFSpec, arch_of, load_config
from ..errors import CorruptWeightsError, MissingFileError, TokenizerError, UnsupportedArchitectureError
from .vocab import VocabData, load_vocab
from ..weights import TensorEntry, all_entries, read_converted

ROPE_SCALINGS = (None, "default", "linear", "llama3")
OUT_TYPES = {"F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
             "F32": gguf.LlamaFileType.ALL_F32}
# Config keys that make llama.cpp's converter write metadata we do not (layer-norm eps, experts, pooling...).
FOREIGN_KEYS = ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "num_local_experts", "num_experts",
                "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "mrope_section")

ProgressFn = Callable[[int, int], None]


def hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as transformers completes it (defaults such as head_dim filled in, RoPE settings under
    rope_parameters): llama.cpp's converter reads this form, so our metadata must too. The raw dict when
    transformers does not know the model type (llama.cpp then falls back to it as well)."""
    try:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[config["model_type"]].from_dict(dict(config)).to_dict()
    except Exception:   # unknown model_type or a config transformers rejects: both tools read the raw file
        return dict(config)


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
    vocab_size: int | None = None
    spec: GGUFSpec | None = field(default=None, compare=False, repr=False)
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)   # hf_config() form

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> "HParams":
        """The hyperparameters of a config.json our converter supports; UnsupportedArchitectureError for an
        architecture or setting it does not reproduce exactly (llama.cpp's converter then takes the model)."""
        _, spec = arch_of(raw)
        config = hf_config(raw)
        try:
            n_head = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            rope = rope_parameters(config)
            scaling = rope if rope.get("rope_type", "default") != "default" else None
            hp = cls(
                n_layer=int(config["num_hidden_layers"]),
                hidden=hidden,
                ffn=int(config["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(config.get("num_key_value_heads") or n_head),
                head_dim=int(config.get("head_dim") or hidden // n_head),
                n_ctx=int(config.get("max_position_embeddings") or 4096),
                rms_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta") or 10000.0),
                rope_scaling=scaling,
                vocab_size=int(config["vocab_size"]) if config.get("vocab_size") else None,
                spec=spec,
                config=config,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MissingFileError(f"config.json lacks a usable value for {exc}; is this a causal LM config?") from None
        if hp.rope_kind not in ROPE_SCALINGS or (hp.rope_kind == "llama3" and not spec.permute_qk):
            raise UnsupportedArchitectureError(
                f"RoPE scaling '{hp.rope_kind}' is not supported yet for {spec.gguf_name} "
                f"(supported: linear{', llama3' if spec.permute_qk else ''})."
            )
        foreign = [k for k in FOREIGN_KEYS if k in config]
        if foreign or config.get("is_causal") is False:
            raise UnsupportedArchitectureError(
                f"config.json sets {', '.join(foreign) or 'is_causal'}, which QuantSpace's converter does not "
                "reproduce for this family.")
        if spec.vocab_rules == "llama" and hp.vocab_size == 32016:
            _refuse("CodeLlama's infill tokens (vocab_size 32016) are set by llama.cpp's converter")
        for check in spec.checks:
            CONFIG_CHECKS[check](config)
        return hp

    @property
    def rope_kind(self) -> str | None:
        """The RoPE scaling type; configs name it `rope_type` (newer) or `type` (older)."""
        s = self.rope_scaling or {}
        return s.get("rope_type", s.get("type"))


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of global-attention layers, as llama.cpp's converter reads them (Gemma 3 splits
    them into full_attention and sliding_attention)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    return rope


def _refuse(what: str) -> None:
    raise UnsupportedArchitectureError(f"{what}; QuantSpace's converter does not reproduce that.")


def _check_gemma3_attention(config: dict[str, Any]) -> None:
    # llama.cpp's Gemma 3 graph hard-codes its layout: every sixth layer global, the rest sliding-window.
    types = config.get("layer_types")
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                for i in range(int(config["num_hidden_layers"]))]
    if types is not None and list(types) != expected:
        _refuse("This Gemma 3 config's sliding/global layer pattern is not every sixth layer global")
    if config.get("attn_logit_softcapping") is not None:
        _refuse("This Gemma 3 config sets attn_logit_softcapping")


def _check_smollm3_no_rope(config: dict[str, Any]) -> None:
    # llama.cpp's SmolLM3 graph skips RoPE in every fourth layer and reads no key for it.
    layers = config.get("no_rope_layers")
    expected = [int((i + 1) % 4 != 0) for i in range(int(config["num_hidden_layers"]))]
    if layers is not None and list(layers) != expected:
        _refuse("This SmolLM3 config's no-RoPE layers are not every fourth layer")


def _check_no_long_rope(config: dict[str, Any]) -> None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("long_factor") or rope.get("short_factor"):
        _refuse("This Phi-3 config uses LongRoPE factors")


def _check_no_pooling(config: dict[str, Any]) -> None:
    # (a sentence-transformers folder, with modules.json, is refused in convert())
    if config.get("classifier_pooling") is not None:
        _refuse("This config sets classifier_pooling (a classifier, not a causal LM)")


def _check_not_reranker(config: dict[str, Any]) -> None:
    hints = " ".join(str(config.get(k, "")) for k in ("_name_or_path", "model_type")).lower()
    if "reranker" in hints or "sequenceclassification" in " ".join(config.get("architectures") or []).lower():
        _refuse("This looks like a Qwen3 reranker")


CONFIG_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "gemma3_attention": _check_gemma3_attention,
    "smollm3_no_rope": _check_smollm3_no_rope,
    "no_long_rope": _check_no_long_rope,
    "no_pooling": _check_no_pooling,
    "not_reranker": _check_not_reranker,
}


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


def _write_shared(w: gguf.GGUFWriter, hp: HParams) -> None:
    """The keys llama.cpp's converter writes for every family that keeps its shared set (TextModel)."""
    c = hp.config
    w.add_block_count(hp.n_layer)
    if c.get("max_position_embeddings") is not None:
        w.add_context_length(int(c["max_position_embeddings"]))
    w.add_embedding_length(hp.hidden)
    w.add_feed_forward_length(hp.ffn)
    w.add_head_count(hp.n_head)
    if c.get("num_key_value_heads") is not None:
        w.add_head_count_kv(hp.n_head_kv)
    rope = rope_parameters(c)
    if hp.rope_kind == "linear" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    swa = (c.get("rope_parameters") or {}).get("sliding_attention") or {}
    if swa.get("rope_theta") is not None:
        w.add_rope_freq_base_swa(float(swa["rope_theta"]))
    if c.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    if c.get("head_dim") is not None:
        w.add_key_length(int(c["head_dim"]))
        w.add_value_length(int(c["head_dim"]))


def _keys_llama(w: gguf.GGUFWriter, hp: HParams) -> None:
    w.add_vocab_size(int(hp.config["vocab_size"]))


def _keys_rope_dims(w: gguf.GGUFWriter, hp: HParams) -> None:
    w.add_rope_dimension_count(hp.head_dim)


def _keys_gemma3(w: gguf.GGUFWriter, hp: HParams) -> None:
    """Gemma 3's defaults where its config leaves them out, its final-logit softcap and sliding window."""
    c = hp.config
    w.add_context_length(int(c.get("max_position_embeddings") or 131072))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps") or 1e-6))
    w.add_key_length(int(c.get("head_dim") or 256))
    w.add_value_length(int(c.get("head_dim") or 256))
    w.add_rope_freq_base(float(rope_parameters(c).get("rope_theta") or 1_000_000.0))
    if c.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
    if c.get("sliding_window_pattern") != 1:
        w.add_sliding_window(int(c["sliding_window"]))
    w.add_head_count_kv(int(c.get("num_key_value_heads") or 4))


def _keys_phi3(w: gguf.GGUFWriter, hp: HParams) -> None:
    """Phi-3's own set: the original context length, RoPE dimensions from partial_rotary_factor, and a
    sliding window of 0 for Phi-4 (none in its config), which llama.cpp reads as "no sliding window"."""
    c = hp.config
    rope = c.get("rope_parameters") or {}
    original = rope.get("original_max_position_embeddings", c.get("original_max_position_embeddings"))
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    w.add_context_length(hp.n_ctx)
    w.add_rope_scaling_orig_ctx_len(int(original))
    w.add_embedding_length(hp.hidden)
    w.add_feed_forward_length(hp.ffn)
    w.add_block_count(hp.n_layer)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(int(c["num_key_value_heads"]))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_rope_dimension_count(int(float(partial) * hp.hidden) // hp.n_head)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_sliding_window(int(c.get("sliding_window") or 0))


HPARAM_KEYS: dict[str, Callable[[gguf.GGUFWriter, HParams], None]] = {
    "vocab_size": _keys_llama,
    "rope_dimension_count": _keys_rope_dims,
    "gemma3": _keys_gemma3,
    "phi3": _keys_phi3,
}


def _write_hparams(w: gguf.GGUFWriter, hp: HParams, spec: GGUFSpec, ftype: int) -> None:
    if not spec.own_keys:
        _write_shared(w, hp)
    # A family's own keys may restate shared ones (Gemma 3's defaults): the later value wins, as in llama.cpp's
    # converter, and gguf's warning about it is noise here.
    log = logging.getLogger("gguf.gguf_writer")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        for name in spec.extra_keys:
            HPARAM_KEYS[name](w, hp)
    finally:
        log.setLevel(level)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_general(w: gguf.GGUFWriter, model_dir: Path, name: str | None) -> None:
    """general.* as llama.cpp's converter writes them: gguf's own reading of the folder (model card, config,
    generation_config.json), the parameter count, and what it guesses from the folder's name. With `name` (the
    model's name, e.g. a Hub repo's, whose download sits in a folder named by commit hash) those guesses are made
    from `name` instead, as if the folder were called so, and general.name is `name`."""
    total, shared, expert, experts = w.get_total_parameter_count()
    with tempfile.TemporaryDirectory(prefix="quantspace-meta-") as tmp:
        folder = model_dir
        if name is not None and name != model_dir.name:
            folder = Path(tmp) / name.rsplit("/", 1)[-1]
            folder.mkdir()
            for part in ("README.md", "config.json", "generation_config.json"):   # what gguf's Metadata reads
                if (model_dir / part).is_file():
                    (folder / part).symlink_to((model_dir / part).absolute())
        meta = gguf.Metadata.load(None, folder, None, total)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, experts)
    if meta.sampling_penalty_repeat is None:   # llama.cpp's gguf-py also reads transformers' name for it
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            try:
                meta.sampling_penalty_repeat = json.loads(gen.read_text(encoding="utf-8")).get("repetition_penalty")
            except ValueError:
                pass
    if name is not None:
        meta.name = name
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)


@dataclass(frozen=True)
class _Planned:
    entry: TensorEntry | None     # None for tensors we synthesise (rope_freqs)...
    name: str                     # GGUF name
    shape: tuple[int, ...]
    out: str                      # "F32", "F16" or "BF16"
    permute_heads: int = 0
    data: np.ndarray | None = None  # ...whose data is then here
    shift: float = 0.0            # added to every value (Gemma's norms)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.out == "F32" else 2)


def plan(entries: list[TensorEntry], spec: GGUFSpec, hp: HParams, out_type: str) -> list[_Planned]:
    """Every GGUF tensor the converter writes: name, shape and type (the size estimate reads it too)."""
    names = gguf.get_tensor_name_map(spec.gguf_arch, hp.n_layer)
    planned = []
    factors = llama3_rope_factors(hp)
    if factors is not None:   # llama.cpp's converter writes it first
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(_Planned(None, name, factors.shape, "F32", data=factors))
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
        if spec.trim_embedding and mapped == "token_embd.weight" and hp.vocab_size and e.shape[0] > hp.vocab_size:
            # rows are contiguous: the first vocab_size of them are a shorter tensor at the same offset
            e = replace(e, shape=(hp.vocab_size, *e.shape[1:]), nbytes=e.nbytes // e.shape[0] * hp.vocab_size)
        shift = spec.norm_shift if e.name.endswith("norm.weight") else 0.0
        # Norms and biases are tiny and precision-sensitive: llama.cpp keeps them in F32.
        out = "F32" if len(e.shape) == 1 or mapped.endswith("_norm.weight") or out_type == "F32" else out_type
        planned.append(_Planned(e, mapped, e.shape, out, heads, shift=shift))
    return planned


def _materialise(p: _Planned) -> np.ndarray:
    if p.entry is None:
        assert p.data is not None
        return p.data
    order = permute_rows(np.arange(p.shape[0]), p.permute_heads) if p.permute_heads else None
    if not p.shift:
        return read_converted(p.entry, p.out, row_order=order)
    # As llama.cpp's converter: the shift is added in the checkpoint's precision when that is F16, else in F32.
    if p.entry.dtype == "F16":
        shifted = read_converted(p.entry, "F16", row_order=order) + np.float16(p.shift)
    else:
        shifted = read_converted(p.entry, "F32", row_order=order) + np.float32(p.shift)
    return shifted.astype(np.float16 if p.out == "F16" else np.float32)


def convert(model_dir: Path, out_path: Path, *, out_type: str = "F16", name: str | None = None,
            progress: ProgressFn | None = None) -> Path:
    """Write `out_path` (atomically) from an HF model folder. Returns the path.

    Tensors and metadata are those llama.cpp's convert_hf_to_gguf.py writes for the same folder; general.name
    is `name` when given (else derived from the folder as llama.cpp's converter does).
    """
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {sorted(OUT_TYPES)}")
    config = load_config(model_dir)
    hp = HParams.from_config(config)
    spec = hp.spec
    assert spec is not None
    if "no_pooling" in spec.checks and (model_dir / "modules.json").is_file():
        raise UnsupportedArchitectureError("This is a sentence-transformers embedding model (modules.json); "
                                           "QuantSpace's converter makes causal LMs only.")
    if spec.trim_embedding and not (model_dir / "tokenizer.model").is_file():
        raise TokenizerError(f"{spec.gguf_name} needs tokenizer.model for its GGUF; the folder has none.")
    entries = all_entries(model_dir)
    planned = plan(entries, spec, hp, out_type)
    embed = next((p for p in planned if p.name == "token_embd.weight"), None)
    if embed is None:
        raise CorruptWeightsError("The checkpoint has no token embedding tensor; it is incomplete.")
    vocab = load_vocab(model_dir, n_vocab=embed.shape[0], vocab_size=hp.vocab_size, spm_reader=spec.spm_reader,
                       spm_json=spec.gguf_arch == gguf.MODEL_ARCH.LLAMA)
    vocab_rules(model_dir, spec, hp, vocab)

    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, spec.gguf_name)
    try:
        _write_hparams(writer, hp, spec, int(OUT_TYPES[out_type]))
        vocab.write(writer)
        for p in planned:
            dtype = np.uint16 if p.out == "BF16" else np.dtype(np.float16 if p.out == "F16" else np.float32)
            raw = gguf.GGMLQuantizationType.BF16 if p.out == "BF16" else None
            writer.add_tensor_info(p.name, p.shape, dtype, p.nbytes, raw_dtype=raw)
        _write_general(writer, model_dir, name)   # counts parameters from the tensors just listed
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


def vocab_rules(model_dir: Path, spec: GGUFSpec, hp: HParams, vocab: VocabData) -> None:
    """Tokenizer keys llama.cpp's converter sets per family after reading the vocabulary."""
    if spec.vocab_rules == "llama":
        value = _read_json(model_dir / "tokenizer_config.json").get("add_prefix_space")
        if isinstance(value, bool):
            vocab.add_space_prefix = value
        if hp.vocab_size == 49152 and vocab.special is not None:   # its rule for small Granite models
            vocab.special.add_special_token["bos"] = False
    elif spec.vocab_rules == "gemma3" and vocab.model == "llama":
        vocab.add_space_prefix = False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}


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

