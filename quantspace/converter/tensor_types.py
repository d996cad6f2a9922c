"""The tensor types llama.cpp's quantizer picks for each variant, and the file size that follows, without running it.

llama.cpp does not write one type per file: it bumps some tensors up (attn_v, ffn_down, attn_output in some
layers, the output matrix), and a tensor whose rows do not split into whole blocks falls back to a type with
smaller blocks (SmolLM2's hidden size 576 is not a multiple of 256, so its K-quants become Q5_0, Q8_0...).
The rules below are those of the llama.cpp vendored in llama-cpp-python 0.3.36 (src/llama-quant.cpp,
`llama_tensor_get_type`), written as data, for dense models without an importance matrix.
"""

from __future__ import annotations

import math
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

# The type most 2-D weights get, per file type.
DEFAULT_TYPE: dict[F, Q] = {
    F.MOSTLY_F16: Q.F16, F.MOSTLY_BF16: Q.BF16, F.MOSTLY_Q8_0: Q.Q8_0, F.MOSTLY_Q4_0: Q.Q4_0,
    F.MOSTLY_Q6_K: Q.Q6_K, F.MOSTLY_Q5_K_M: Q.Q5_K, F.MOSTLY_Q5_K_S: Q.Q5_K, F.MOSTLY_Q4_K_M: Q.Q4_K,
    F.MOSTLY_Q4_K_S: Q.Q4_K, F.MOSTLY_Q3_K_M: Q.Q3_K, F.MOSTLY_Q3_K_S: Q.Q3_K, F.MOSTLY_Q2_K: Q.Q2_K,
}


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's choice depends on beyond a tensor's own name and shape."""
    n_layer: int
    n_gqa: int = 1            # attention heads per KV head
    is_70b: bool = False      # llama.cpp's LLM_TYPE_70B (80 layers): attn_v gets more bits


# GGUF name → (shape in PyTorch order, i.e. a row is the last dimension; type in the file)
Tensors = dict[str, tuple[tuple[int, ...], Q]]

# A layer rule's condition: (layer index i, layer count n, model) → applies?
Cond = Callable[[int, int, ModelFacts], bool]


def more_bits(i: int, n: int, m: ModelFacts) -> bool:
    """The first and last eighth of the layers, and every third layer between them."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


CONDITIONS: dict[str, Cond] = {
    "all": lambda i, n, m: True,
    "more_bits": more_bits,
    "first_2": lambda i, n, m: i < 2,
    "first_4": lambda i, n, m: i < 4,
    "first_eighth": lambda i, n, m: i < n // 8,
    "first_sixteenth": lambda i, n, m: i < n // 16,
    "gqa_4": lambda i, n, m: m.n_gqa >= 4,
}

# file type → [(tensor role, condition, type)]: the first rule of a role whose condition holds wins.
LAYER_RULES: dict[F, list[tuple[str, str, Q]]] = {
    F.MOSTLY_Q2_K: [("attn_v", "gqa_4", Q.Q4_K), ("attn_v", "all", Q.Q3_K),
                    ("ffn_down", "all", Q.Q3_K), ("attn_output", "all", Q.Q3_K)],
    F.MOSTLY_Q3_K_M: [("attn_v", "first_2", Q.Q5_K), ("attn_v", "all", Q.Q4_K),
                      ("ffn_down", "first_sixteenth", Q.Q5_K), ("ffn_down", "all", Q.Q4_K),
                      ("attn_output", "all", Q.Q4_K)],
    F.MOSTLY_Q4_K_S: [("attn_v", "first_4", Q.Q5_K), ("ffn_down", "first_eighth", Q.Q5_K)],
    F.MOSTLY_Q4_K_M: [("attn_v", "more_bits", Q.Q6_K), ("ffn_down", "more_bits", Q.Q6_K)],
    F.MOSTLY_Q5_K_M: [("attn_v", "more_bits", Q.Q6_K), ("ffn_down", "more_bits", Q.Q6_K)],
}

# A type whose block does not divide a row's length falls back to one with 32-element blocks.
FALLBACK: dict[Q, Q] = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def block_size(t: Q) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def is_quantized(t: Q) -> bool:
    return t not in (Q.F32, Q.F16, Q.BF16)


def role(name: str) -> str:
    """llama.cpp's tensor category, from the GGUF name."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    if ".attn_qkv.weight" in name:
        return "attn_v"   # a fused q/k/v (Phi-3) gets the value projection's rules (measured on Q4_K_M)
    for part in ("attn_v", "attn_k", "attn_q", "attn_output"):
        if f".{part}.weight" in name:
            return part
    for part in ("ffn_up", "ffn_gate", "ffn_down"):
        if f".{part}" in name:
            return part
    return "other"


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes 2-D (and 3-D) weights only, never norms; the rest keeps its type."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


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


def choose_types(tensors: Tensors, ftype: F, model: ModelFacts) -> dict[str, Q]:
    """GGUF name → the type llama.cpp writes when it quantizes the F16 file `tensors` to `ftype`."""
    default = DEFAULT_TYPE[ftype]
    rules = LAYER_RULES.get(ftype, [])
    tied = "output.weight" not in tensors
    counts = {r: sum(role(n) == r for n in tensors) for r in ("attn_v", "ffn_down")}
    out: dict[str, Q] = {}
    for name, (shape, current) in tensors.items():
        if not quantizable(name, shape) or not is_quantized(default):
            out[name] = current
            continue
        n_cols = shape[-1]
        kind = role(name)
        t = default
        if kind == "output" or (tied and kind == "token_embd"):
            # The output matrix gets 6 bits (Q8_0 stays); Q8_0 too when the default type's blocks do not fit.
            t = Q.Q8_0 if n_cols % block_size(default) or default == Q.Q8_0 else Q.Q6_K
        else:
            # llama.cpp counts attn_v tensors in file order; ffn_down's count is the layer count.
            i, n = layer_of(name), model.n_layer if kind == "ffn_down" else counts.get(kind, 0)
            for rule_role, cond, rule_type in rules:
                if rule_role == kind and i is not None and CONDITIONS[cond](i, n, model):
                    t = rule_type
                    break
            if kind == "attn_v" and model.is_70b and t in (Q.Q3_K, Q.Q4_K):
                t = Q.Q5_K
        out[name] = fallback(t, n_cols)
    return out


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
    return ModelFacts(hp.n_layer, max(1, hp.n_head // hp.n_head_kv), is_70b)


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
    return ModelFacts(int(text.get("num_hidden_layers") or 1), max(1, heads // int(text.get("num_key_value_heads")
                                                                                 or heads)))


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
