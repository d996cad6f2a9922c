"""GGUF per-tensor type control: the options, their checks before any work, and llama.cpp's quantize params.

As llama-quantize's --output-tensor-type, --token-embedding-type and --tensor-type: a ggml type for output.weight,
one for token_embd.weight, and `regex=TYPE` pairs (the first pattern found in a tensor's name wins; llama.cpp
still falls back to a smaller-block type where a row does not split into the pattern type's blocks).
"""

from __future__ import annotations

import ctypes
import re
from typing import Any, Iterable

import gguf

from ..converter.tensor_types import IMATRIX_TYPES, Overrides, block_size
from ..errors import BadOptionError
from . import Option

Q = gguf.GGMLQuantizationType

# What llama.cpp's quantizer can write a weight as (ggml type names; F32 and the dot-product-only types excluded).
TENSOR_TYPES: dict[str, Q] = {t.name: t for t in (
    Q.F16, Q.BF16, Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q5_1, Q.Q5_0, Q.Q4_K, Q.Q4_1, Q.Q4_0, Q.IQ4_NL, Q.IQ4_XS,
    Q.Q3_K, Q.IQ3_S, Q.IQ3_XXS, Q.Q2_K, Q.IQ2_S, Q.IQ2_XS, Q.IQ2_XXS, Q.IQ1_M, Q.IQ1_S, Q.TQ2_0, Q.TQ1_0)}
GGML_TYPE_COUNT = 43   # ggml.h of the llama.cpp we ship: the "no type given" value of the quantize params

TYPE_OPTIONS: tuple[Option, ...] = (
    Option("output_type", "", "ggml type of output.weight, e.g. Q8_0 (empty: llama.cpp's choice)",
           label="Output tensor type", advanced=True),
    Option("embedding_type", "", "ggml type of token_embd.weight, e.g. Q4_K (empty: llama.cpp's choice)",
           label="Token embedding type", advanced=True),
    Option("tensor_types", "", "comma-separated REGEX=TYPE pairs as llama-quantize's --tensor-type, e.g. "
           "ffn_down=Q6_K,attn_v=Q8_0 (the first pattern found in a tensor's name wins)",
           label="Per-tensor types (REGEX=TYPE, ...)", advanced=True),
)

# Regex syntax Python accepts but llama.cpp's std::regex (ECMAScript) does not: lookbehind, named groups, flags.
NOT_ECMASCRIPT = re.compile(r"\(\?(?![:=!])")


def tensor_type(value: str, what: str) -> Q:
    """A ggml type name, any case; BadOptionError names the allowed ones (and the tensor type of a file type)."""
    key = value.strip().upper()
    if key in TENSOR_TYPES:
        return TENSOR_TYPES[key]
    hint = ""
    from ..converter.tensor_types import DEFAULT_TYPE
    from .gguf import VARIANTS

    if key in VARIANTS:
        hint = f" ({key} is a file type; most of its tensors are {DEFAULT_TYPE[VARIANTS[key].ftype].name})"
    raise BadOptionError(f"Unknown tensor type '{value.strip()}' in {what}{hint}. "
                         f"Use one of: {', '.join(TENSOR_TYPES)}.")


def split_pairs(text: str) -> list[str]:
    """`a=X,b{1,3}=Y` → ['a=X', 'b{1,3}=Y']: a comma inside a pattern stays there (types have none)."""
    pairs: list[str] = []
    pending = ""
    for piece in text.split(","):
        pending = f"{pending},{piece}" if pending else piece
        if "=" in piece:
            pairs.append(pending.strip())
            pending = ""
    if pending.strip():
        pairs.append(pending.strip())
    return [p for p in pairs if p]


def pattern_types(text: str) -> tuple[tuple[str, Q], ...]:
    """The tensor_types option as (regex, type) pairs, checked as llama.cpp will compile them."""
    out = []
    for pair in split_pairs(text or ""):
        pattern, sep, name = pair.rpartition("=")
        pattern = pattern.strip().lower()   # llama-quantize lower-cases the name part too
        if not sep or not pattern or not name.strip():
            raise BadOptionError(f"tensor_types entry '{pair}' must be REGEX=TYPE, e.g. ffn_down=Q6_K.")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise BadOptionError(f"tensor_types pattern '{pattern}' is not a valid regular expression: {exc}.") \
                from None
        if NOT_ECMASCRIPT.search(pattern):
            raise BadOptionError(f"tensor_types pattern '{pattern}' uses (?...) syntax llama.cpp's regex engine "
                                 "(ECMAScript) lacks; only (?:...), (?=...) and (?!...) work.")
        out.append((pattern, tensor_type(name, f"tensor_types entry '{pair}'")))
    return tuple(out)


def overrides_of(options: dict[str, Any]) -> Overrides:
    """The per-tensor options as llama.cpp's quantize params will get them; BadOptionError for a bad one."""
    def one(key: str) -> Q | None:
        value = str(options.get(key) or "").strip()
        return tensor_type(value, key) if value else None

    return Overrides(output=one("output_type"), embedding=one("embedding_type"),
                     patterns=pattern_types(str(options.get("tensor_types") or "")))


def imatrix_off(options: dict[str, Any]) -> bool:
    # A missing option (a version without the imatrix) counts as "auto": nothing is refused for it.
    return str(options.get("imatrix", "auto") or "auto").strip().lower() == "off"


def check_imatrix(options: dict[str, Any], needy: Iterable[str], overrides: Overrides) -> None:
    """With the imatrix off, refuse what llama.cpp cannot write without one, before any work."""
    if not imatrix_off(options):
        return
    needy = list(needy)
    if needy:
        one = len(needy) == 1
        raise BadOptionError(f"{', '.join(needy)} need{'s' if one else ''} an importance matrix (llama.cpp will not "
                             f"make {'it' if one else 'them'} without one) and imatrix is off: set imatrix to auto "
                             "or a file, or pick other variants.")
    bad = sorted({t.name for _, t in overrides.patterns if t in IMATRIX_TYPES})
    if bad:
        raise BadOptionError(f"tensor_types asks for {', '.join(bad)}, which llama.cpp writes only with an "
                             "importance matrix, and imatrix is off: set imatrix to auto or a file, or pick "
                             "another type.")


def check_fit(tensors: dict[str, tuple[tuple[int, ...], Q]], overrides: Overrides) -> None:
    """llama.cpp writes a given output/embedding type as it is (no fallback): its blocks must split the rows."""
    for key, name, t in (("output_type", "output.weight", overrides.output),
                         ("embedding_type", "token_embd.weight", overrides.embedding)):
        if t is None or name not in tensors:
            continue
        n_cols = tensors[name][0][-1]
        if n_cols % block_size(t):
            fits = [n for n, q in TENSOR_TYPES.items() if n_cols % block_size(q) == 0]
            raise BadOptionError(f"{key} {t.name} packs {block_size(t)} weights per block, but {name} has rows of "
                                 f"{n_cols}; pick one that fits ({', '.join(fits)}) or leave it empty.")


def is_ternary(config: dict[str, Any]) -> bool:
    """A BitNet b1.58-style model: its weights are already {-1, 0, +1} × scale, what TQ1_0/TQ2_0 store."""
    archs = " ".join(config.get("architectures") or []).lower()
    method = str((config.get("quantization_config") or {}).get("quant_method") or "").lower()
    return "bitnet" in archs or method == "bitnet"


def check_ternary(config: dict[str, Any], ternary: list[str]) -> None:
    """TQ1_0/TQ2_0 keep one scale per 256 weights and round each weight to -1, 0 or +1 of it: ordinary weights
    mostly become 0 (measured on a random Llama: 87% zeros, 81% relative error), so llama.cpp writes garbage."""
    if ternary and not is_ternary(config):
        arch = ", ".join(config.get("architectures") or []) or "this model"
        raise BadOptionError(f"{', '.join(ternary)} store ternary weights (-1, 0, +1 times a scale) for BitNet "
                             f"b1.58 models; {arch} has ordinary weights, which they would mostly round to zero. "
                             "For a tiny file pick IQ2_XXS or IQ1_M (with an imatrix) or Q2_K.")


def apply_overrides(params: Any, overrides: Overrides) -> list[Any]:
    """Set output/embedding types and tt_overrides on llama.cpp's quantize params; returns what must stay alive
    until the call returns (the null-terminated override array and its strings)."""
    import llama_cpp

    if overrides.output is not None:
        params.output_tensor_type = int(overrides.output)
    if overrides.embedding is not None:
        params.token_embedding_type = int(overrides.embedding)
    if not overrides.patterns:
        return []
    entries = (llama_cpp.llama_model_tensor_override * (len(overrides.patterns) + 1))()
    for entry, (pattern, t) in zip(entries, overrides.patterns):
        entry.pattern, entry.type = pattern.encode(), int(t)
    entries[len(overrides.patterns)].pattern, entries[len(overrides.patterns)].type = None, GGML_TYPE_COUNT
    params.tt_overrides = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    return [entries]


def recipe(overrides: Overrides) -> dict[str, Any]:
    """The per-tensor choices for a report, only those given."""
    out: dict[str, Any] = {}
    if overrides.output is not None:
        out["output_type"] = overrides.output.name
    if overrides.embedding is not None:
        out["embedding_type"] = overrides.embedding.name
    if overrides.patterns:
        out["tensor_types"] = {p: t.name for p, t in overrides.patterns}
    return out
