"""The tensor types llama.cpp's quantizer picks for each variant, and the file size that follows, without running it.

llama.cpp does not write one type per file: it bumps some tensors up (attn_v, ffn_down, attn_output in some
layers, the output matrix), and a tensor whose rows do not split into whole blocks falls back to a type with
smaller blocks (SmolLM2's hidden size 576 is not a multiple of 256, so its K-quants become Q5_0, Q8_0...).
The rules below are those of the llama.cpp vendored in llama-cpp-python 0.3.36 (src/llama-quant.cpp,
`llama_tensor_get_type`), written as data: every file type, with or without an importance matrix (a few rules
depend on it), with a user's per-tensor overrides (output/token-embedding type, regex → type patterns).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf

from ..archs import arch_of
from .streaming import HParams, plan
from ..weights import TensorEntry

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT

# The type most 2-D weights get, per file type (llama_ftype_get_default_type).
DEFAULT_TYPE: dict[F, Q] = {
    F.MOSTLY_F16: Q.F16, F.MOSTLY_BF16: Q.BF16, F.MOSTLY_Q8_0: Q.Q8_0,
    F.MOSTLY_Q4_0: Q.Q4_0, F.MOSTLY_Q4_1: Q.Q4_1, F.MOSTLY_Q5_0: Q.Q5_0, F.MOSTLY_Q5_1: Q.Q5_1,
    F.MOSTLY_Q6_K: Q.Q6_K, F.MOSTLY_Q5_K_M: Q.Q5_K, F.MOSTLY_Q5_K_S: Q.Q5_K, F.MOSTLY_Q4_K_M: Q.Q4_K,
    F.MOSTLY_Q4_K_S: Q.Q4_K, F.MOSTLY_Q3_K_L: Q.Q3_K, F.MOSTLY_Q3_K_M: Q.Q3_K, F.MOSTLY_Q3_K_S: Q.Q3_K,
    F.MOSTLY_Q2_K: Q.Q2_K,
    F.MOSTLY_IQ4_XS: Q.IQ4_XS, F.MOSTLY_IQ4_NL: Q.IQ4_NL, F.MOSTLY_IQ3_M: Q.IQ3_S, F.MOSTLY_IQ3_S: Q.IQ3_S,
    F.MOSTLY_IQ3_XS: Q.IQ3_S, F.MOSTLY_IQ3_XXS: Q.IQ3_XXS, F.MOSTLY_IQ2_M: Q.IQ2_S, F.MOSTLY_IQ2_S: Q.IQ2_XS,
    F.MOSTLY_IQ2_XS: Q.IQ2_XS, F.MOSTLY_IQ2_XXS: Q.IQ2_XXS, F.MOSTLY_IQ1_M: Q.IQ1_M, F.MOSTLY_IQ1_S: Q.IQ1_S,
    F.MOSTLY_TQ1_0: Q.TQ1_0, F.MOSTLY_TQ2_0: Q.TQ2_0,
}

# Tensor types llama.cpp refuses to write without an importance matrix (except as token_embd/output).
IMATRIX_TYPES = frozenset({Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS})


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's choice depends on beyond a tensor's own name and shape."""
    n_layer: int
    n_gqa: int = 1            # attention heads per KV head
    is_70b: bool = False      # llama.cpp's LLM_TYPE_70B (80 layers): attn_v gets more bits
    n_expert: int = 0         # experts per MoE layer (Mixtral's 8 get their own bumps)


@dataclass(frozen=True)
class Overrides:
    """A user's per-tensor choices, as llama.cpp's quantize params take them: output_tensor_type,
    token_embedding_type and tt_overrides (regex → type, the first match wins)."""
    output: Q | None = None
    embedding: Q | None = None
    patterns: tuple[tuple[str, Q], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.output or self.embedding or self.patterns)


@dataclass(frozen=True)
class Site:
    """A tensor as llama.cpp's rules see it."""
    i: int              # its index among the tensors of its role (their layer, for FFN tensors of a MoE)
    count: int          # llama.cpp's raw counter for its role (the IQ1/IQ2 ffn_down rule reads it)
    n: int              # attn_v: how many there are; FFN: the layer count
    model: ModelFacts
    imatrix: bool       # llama.cpp is given an importance matrix


# Tensors in the file as a mapping: GGUF name → (shape in PyTorch order, i.e. a row is the last dimension; type)
Tensors = dict[str, tuple[tuple[int, ...], Q]]

# A rule's condition: where the tensor is → applies?
Cond = Callable[[Site], bool]


def more_bits(i: int, n: int) -> bool:
    """The first and last eighth of the layers, and every third layer between them."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


CONDITIONS: dict[str, Cond] = {
    "all": lambda s: True,
    "more_bits": lambda s: more_bits(s.i, s.n),
    "first_2": lambda s: s.i < 2,
    "first_4": lambda s: s.i < 4,
    "first_eighth": lambda s: s.i < s.n // 8,
    "first_sixteenth": lambda s: s.i < s.n // 16,
    "middle": lambda s: s.n // 8 <= s.i < 7 * s.n // 8,
    "counted_first_eighth": lambda s: s.count < s.n // 8,
    "gqa_4": lambda s: s.model.n_gqa >= 4,
    "gqa_4_or_experts_4": lambda s: s.model.n_gqa >= 4 or s.model.n_expert >= 4,
    "experts_8": lambda s: s.model.n_expert == 8,
    "not_experts_8": lambda s: s.model.n_expert != 8,
    "experts_8_more_bits": lambda s: s.model.n_expert == 8 and more_bits(s.i, s.n),
    "no_imatrix": lambda s: not s.imatrix,
    "no_imatrix_first_eighth": lambda s: not s.imatrix and s.i < s.n // 8,
    "imatrix_first_eighth": lambda s: s.imatrix and s.i < s.n // 8,
}

# Rules: tensor role → [(condition, type)], the first whose condition holds wins; no rule keeps the default.
Rules = dict[str, list[tuple[str, Q]]]
E8 = ("experts_8", Q.Q5_K)   # attn_output of an 8-expert model, for most file types

# The 1- and 2-bit IQ file types have their own branch in llama.cpp.
IQ_LOW = (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M)


def _iq_low_rules(ftype: F) -> Rules:
    wider = Q.IQ3_S if ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M) else Q.Q2_K
    output = {F.MOSTLY_IQ1_S: Q.IQ2_XXS, F.MOSTLY_IQ1_M: Q.IQ2_XXS,
              F.MOSTLY_IQ2_S: Q.IQ3_S, F.MOSTLY_IQ2_M: Q.IQ3_S}.get(ftype)
    return {"attn_v": [("gqa_4_or_experts_4", Q.Q4_K), ("all", wider)],
            "attn_k": [("experts_8", Q.Q4_K)],
            "ffn_down": [("counted_first_eighth", wider)],
            "attn_output": [E8] + ([("all", output)] if output else [])}


RULES: dict[F, Rules] = {
    F.MOSTLY_Q2_K: {"attn_v": [("gqa_4", Q.Q4_K), ("all", Q.Q3_K)], "ffn_down": [("all", Q.Q3_K)],
                    "attn_output": [E8, ("all", Q.Q3_K)]},
    F.MOSTLY_Q3_K_S: {"attn_output": [E8]},
    F.MOSTLY_Q3_K_M: {"attn_v": [("first_2", Q.Q5_K), ("all", Q.Q4_K)],
                      "ffn_down": [("first_sixteenth", Q.Q5_K), ("all", Q.Q4_K)],
                      "attn_output": [E8, ("all", Q.Q4_K)]},
    F.MOSTLY_Q3_K_L: {"attn_v": [("all", Q.Q5_K)], "ffn_down": [("all", Q.Q5_K)],
                      "attn_output": [("not_experts_8", Q.Q5_K)]},
    F.MOSTLY_Q4_K_S: {"attn_v": [("first_4", Q.Q5_K)], "ffn_down": [("first_eighth", Q.Q5_K)],
                      "attn_output": [E8]},
    F.MOSTLY_Q4_K_M: {"attn_v": [("more_bits", Q.Q6_K)], "ffn_down": [("more_bits", Q.Q6_K)], "attn_output": [E8]},
    F.MOSTLY_Q5_K_M: {"attn_v": [("more_bits", Q.Q6_K)], "ffn_down": [("more_bits", Q.Q6_K)]},
    # With an imatrix, the first ffn_down layers get the _1 type (llama.cpp: "guard against craziness").
    F.MOSTLY_Q4_0: {"ffn_down": [("imatrix_first_eighth", Q.Q4_1)]},
    F.MOSTLY_Q5_0: {"ffn_down": [("imatrix_first_eighth", Q.Q5_1)]},
    F.MOSTLY_IQ4_NL: {"attn_v": [("gqa_4", Q.Q5_K)], "ffn_down": [("no_imatrix_first_eighth", Q.Q5_K)],
                      "attn_output": [E8]},
    F.MOSTLY_IQ4_XS: {"attn_v": [("gqa_4", Q.Q5_K)], "ffn_down": [("no_imatrix_first_eighth", Q.Q5_K)],
                      "attn_output": [E8]},
    F.MOSTLY_IQ3_M: {"attn_v": [("all", Q.Q4_K)],
                     "ffn_down": [("first_eighth", Q.Q4_K), ("experts_8_more_bits", Q.Q4_K)],
                     "attn_output": [E8, ("all", Q.Q4_K)]},
    F.MOSTLY_IQ3_S: {"attn_v": [("gqa_4", Q.Q4_K)], "attn_output": [E8]},
    F.MOSTLY_IQ3_XS: {"attn_v": [("gqa_4", Q.Q4_K)], "attn_k": [("all", Q.IQ3_XXS)], "attn_q": [("all", Q.IQ3_XXS)],
                      "ffn_gate": [("middle", Q.IQ3_XXS)], "ffn_up": [("middle", Q.IQ3_XXS)], "attn_output": [E8]},
    F.MOSTLY_IQ3_XXS: {"attn_v": [("gqa_4", Q.Q4_K), ("no_imatrix", Q.IQ3_S)],
                       "attn_k": [("all", Q.IQ2_S)], "attn_q": [("all", Q.IQ2_S)],
                       "ffn_down": [("no_imatrix_first_eighth", Q.Q4_K), ("no_imatrix", Q.Q3_K)],
                       "attn_output": [E8, ("all", Q.IQ3_S)]},
    **{f: _iq_low_rules(f) for f in IQ_LOW},
}

# An untied token embedding's type, where it is not the file type's own.
EMBEDDING_TYPE: dict[F, Q] = {
    F.MOSTLY_IQ2_XXS: Q.Q2_K, F.MOSTLY_IQ2_XS: Q.Q2_K, F.MOSTLY_IQ1_S: Q.Q2_K, F.MOSTLY_IQ1_M: Q.Q2_K,
    F.MOSTLY_IQ2_S: Q.IQ3_S, F.MOSTLY_IQ2_M: Q.IQ3_S, F.MOSTLY_IQ3_XXS: Q.IQ3_S,
    F.MOSTLY_TQ1_0: Q.Q4_K, F.MOSTLY_TQ2_0: Q.Q4_K,
}
# File types whose output matrix gets 5 bits rather than 6.
OUTPUT_Q5_K = (*IQ_LOW, F.MOSTLY_IQ3_XXS)

# A type whose block does not divide a row's length falls back to one with 32-element blocks (32-block types
# that still do not fit become F16).
FALLBACK: dict[Q, Q] = {
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.TQ1_0: Q.Q4_0, Q.TQ2_0: Q.Q4_0,
    Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
    **{t: Q.IQ4_NL for t in (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS)},
}


def block_size(t: Q) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def is_quantized(t: Q) -> bool:
    return t not in (Q.F32, Q.F16, Q.BF16)


def role(name: str) -> str:
    """llama.cpp's tensor category, from the GGUF name."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    if ".attn_qkv.weight" in name or ".attn_kv_b.weight" in name:
        return "attn_v"   # a fused q/k/v (Phi-3) gets the value projection's rules
    for part in ("attn_v", "attn_k", "attn_q", "attn_output"):
        if f".{part}.weight" in name:
            return part
    for part in ("ffn_up", "ffn_gate", "ffn_down"):
        if f".{part}" in name:
            return part
    return "other"


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes 2-D (and 3-D) weights only, never norms or a MoE router; the rest keeps its type."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name \
        and "ffn_gate_inp.weight" not in name


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None


def fallback(t: Q, n_cols: int) -> Q:
    """The type llama.cpp writes when `t` does not fit rows of `n_cols` elements."""
    if n_cols % block_size(t) == 0:
        return t
    if t in FALLBACK:
        t = FALLBACK[t]
    return t if n_cols % block_size(t) == 0 else Q.F16


def file_order(names: Any) -> list[str]:
    """llama.cpp's quantizer walks tensors by layer (non-layer tensors first), then by name."""
    return sorted(names, key=lambda n: (-1 if layer_of(n) is None else layer_of(n), n))


def choose_types(tensors: Tensors, ftype: F, model: ModelFacts, imatrix: bool = False,
                 overrides: Overrides = Overrides()) -> dict[str, Q]:
    """GGUF name → the type llama.cpp writes when it quantizes the F16 file `tensors` to `ftype` (with an
    importance matrix or not, with the user's per-tensor overrides)."""
    default = DEFAULT_TYPE[ftype]
    tied = "output.weight" not in tensors
    n_attn_v = sum(role(n) == "attn_v" for n in tensors)
    counters: dict[str, int] = {}
    patterns = [(re.compile(p), t) for p, t in overrides.patterns]
    out: dict[str, Q] = {}
    for name in file_order(tensors):
        shape, current = tensors[name]
        kind = role(name)
        if not quantizable(name, shape):
            out[name] = current
        elif kind == "token_embd" and overrides.embedding:
            out[name] = overrides.embedding   # given types are written as they are, without a fallback
        elif kind == "output" and overrides.output:
            out[name] = overrides.output
        elif not is_quantized(default):
            out[name] = default
        else:
            t = next((t for p, t in patterns if p.search(name)), None)
            if t is None:
                t = _rule_type(name, shape[-1], kind, ftype, model, imatrix, overrides, tied, counters, n_attn_v)
            out[name] = fallback(t, shape[-1])
    return {n: out[n] for n in tensors}


def _rule_type(name: str, n_cols: int, kind: str, ftype: F, model: ModelFacts, imatrix: bool, overrides: Overrides,
               tied: bool, counters: dict[str, int], n_attn_v: int) -> Q:
    """llama.cpp's own choice for one tensor (llama_tensor_get_type_impl); advances its per-role counter."""
    default = DEFAULT_TYPE[ftype]
    if kind == "output" or (tied and kind == "token_embd"):
        if overrides.output:
            return overrides.output
        # 6 bits (5 for the lowest IQ types; Q8_0 stays); Q8_0 when the default type's blocks do not fit a row.
        if n_cols % block_size(default) or default == Q.Q8_0:
            return Q.Q8_0
        return Q.Q5_K if ftype in OUTPUT_Q5_K else Q.Q6_K
    if kind == "token_embd":
        return EMBEDDING_TYPE.get(ftype, default)
    if kind not in ("attn_v", "attn_k", "attn_q", "attn_output", "ffn_down", "ffn_gate", "ffn_up"):
        return default
    count = counters.get(kind, 0)
    if kind in ("attn_v", "ffn_down", "ffn_gate", "ffn_up"):
        counters[kind] = count + 1
    layer = layer_of(name)
    # FFN tensors of a MoE are placed by their layer (experts and shared experts share one), others by count.
    i = layer if kind.startswith("ffn") and model.n_expert > 1 and layer is not None else count
    site = Site(i, count, n_attn_v if kind == "attn_v" else model.n_layer, model, imatrix)
    t = next((t for cond, t in RULES.get(ftype, {}).get(kind, []) if CONDITIONS[cond](site)), default)
    if ftype not in IQ_LOW and kind == "attn_v" and model.is_70b and t in (Q.Q3_K, Q.Q4_K):
        t = Q.Q5_K   # llama.cpp's 70B rule: 8 heads share attn_v, so more bits cost little
    if ftype not in IQ_LOW and kind in ("attn_v", "attn_k") and model.n_expert == 8:
        t = Q.Q8_0   # Mixtral-style 8 experts: llama.cpp spends ~128 MB on these
    return t


def tensor_bytes(shape: tuple[int, ...], t: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def tensor_info_bytes(tensors: Tensors) -> int:
    """The tensor directory of a GGUF header: name, dimensions, type and offset of each tensor."""
    return sum(8 + len(name.encode()) + 4 + 8 * len(shape) + 4 + 8 for name, (shape, _) in tensors.items())


def file_bytes(tensors: Tensors, types: dict[str, Q], kv_bytes: int) -> int:
    """Size of a GGUF file: fixed header, key/values, tensor directory (padded), then each tensor padded."""
    header = 4 + 4 + 8 + 8 + kv_bytes + tensor_info_bytes(tensors)
    return padded(header) + sum(padded(tensor_bytes(shape, types[name])) for name, (shape, _) in tensors.items())


# --- the F16 file our converter writes, from safetensors headers and config.json only ---

def f16_tensors(shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> Tensors:
    """GGUF name → (shape, type) of the F16 file convert() would write: the converter's own plan."""
    hp = HParams.from_config(config)
    assert hp.spec is not None
    entries = [TensorEntry(name, "F16", tuple(shape), Path(), 0, 2 * math.prod(shape)) for name, shape in shapes.items()]
    return {p.name: (tuple(p.shape), Q[p.out]) for p in plan(entries, hp.spec, hp, "F16")}


def model_facts(config: dict[str, Any]) -> ModelFacts:
    hp = HParams.from_config(config)
    _, spec = arch_of(config)
    # llama.cpp calls 80-layer models 70B (Llama only with grouped-query attention).
    is_70b = hp.n_layer == 80 and (spec.gguf_arch != gguf.MODEL_ARCH.LLAMA or hp.n_head != hp.n_head_kv)
    return ModelFacts(hp.n_layer, max(1, hp.n_head // hp.n_head_kv), is_70b, n_experts(config))


def n_experts(config: dict[str, Any]) -> int:
    """Experts per MoE layer (llama.cpp's expert_count), 0 for a dense model."""
    text = config.get("text_config") or config
    return int(text.get("num_local_experts") or text.get("num_experts") or text.get("n_routed_experts") or 0)


# For files llama.cpp's converter makes: HF name endings → the GGUF names the type rules look at.
GENERIC_NAMES = (("embed_tokens.weight", "token_embd.weight"), ("lm_head.weight", "output.weight"),
                 ("v_proj.weight", "attn_v.weight"), ("k_proj.weight", "attn_k.weight"),
                 ("q_proj.weight", "attn_q.weight"), ("o_proj.weight", "attn_output.weight"),
                 ("down_proj.weight", "ffn_down.weight"), ("up_proj.weight", "ffn_up.weight"),
                 ("gate_proj.weight", "ffn_gate.weight"))


def generic_f16_tensors(shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> Tensors:
    """An approximate F16 file of llama.cpp's converter, for an architecture ours does not have: each HF tensor
    under a GGUF-style name (blk.N.<role> inside numbered layers), 2-D weights F16, the rest F32. Fused or
    split tensors and norms named otherwise make this a close estimate, not an exact one."""
    tensors: Tensors = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        index = next((p for p in parts if p.isdigit()), None)
        gguf_name = next((g for hf, g in GENERIC_NAMES if name.endswith(hf)), ".".join(parts[-2:]))
        if index is not None and not gguf_name.startswith(("token_embd", "output")):
            gguf_name = f"blk.{index}.{len(tensors)}.{gguf_name}"   # unique; still ends as the rules expect
        if not config.get("tie_word_embeddings", False) or gguf_name != "output.weight":
            tensors[gguf_name] = (tuple(shape), Q.F16 if len(shape) >= 2 else Q.F32)
    return tensors


def generic_model_facts(config: dict[str, Any]) -> ModelFacts:
    text = config.get("text_config") or config
    heads = int(text.get("num_attention_heads") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    return ModelFacts(int(text.get("num_hidden_layers") or 1), max(1, heads // kv_heads), n_expert=n_experts(config))


# The key/value part of the header, from what is known before download (config.json, the sizes of the
# tokenizer files). The vocabulary dominates it: each token is a length-prefixed string plus a score and a type,
# and byte-level BPE adds about one merge rule per token. Measured on SmolLM2 (49152 tokens): 40 B per token;
# on 1024-token test vocabularies: 31 (BPE) and 22 (SentencePiece) B per token.
HPARAM_KV_BYTES = 1024           # architecture, sizes, RoPE, file type, special token ids: ~25 short keys
BPE_BYTES_PER_TOKEN = 36
SPM_BYTES_PER_TOKEN = 24


def kv_bytes(config: dict[str, Any], files: dict[str, int | None]) -> int:
    n_vocab = int(config.get("vocab_size") or 0)
    per_token = SPM_BYTES_PER_TOKEN if "tokenizer.model" in files else BPE_BYTES_PER_TOKEN
    # The chat template is copied in; tokenizer_config.json holds it when there is no chat_template.jinja.
    template = files.get("chat_template.jinja") or files.get("tokenizer_config.json") or 0
    return HPARAM_KV_BYTES + n_vocab * per_token + template
