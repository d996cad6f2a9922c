"""The one registry of model families: what each needs for GGUF, AWQ and NF4, as data.

A new family is one entry in FAMILIES (plus its tests). NF4 needs no entry: bitsandbytes quantizes whatever
transformers loads, and its LoRA targets are read from the checkpoint (formats/nf4.py). A family without a
GGUF spec is converted by llama.cpp's own converter when llama.cpp knows it (converter/llama_cpp.py); one
without an AWQ table is refused by AWQ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf

from .awq.layers import Experts, Group, LayerSpec
from .errors import MissingFileError, UnsupportedArchitectureError


# NF4's LoRA targets are the checkpoint's own decoder linears, listed in the order people write them.
LORA_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
              "down_proj")


@dataclass(frozen=True)
class GGUFSpec:
    """What our streaming converter needs to write a family exactly as llama.cpp's converter does."""
    gguf_arch: gguf.MODEL_ARCH
    # HF Llama/Mistral use "rotate half" RoPE; llama.cpp's LLAMA graph expects q/k rows interleaved.
    permute_qk: bool
    # Tensors in HF checkpoints that llama.cpp recomputes itself.
    skip_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # Metadata keys beyond the ones every family gets (names of writers in converter/streaming.py HPARAM_KEYS).
    extra_keys: tuple[str, ...] = ()
    # Added to every "*norm.weight" tensor: Gemma's RMSNorm scales by (1 + w), llama.cpp's by w.
    norm_shift: float = 0.0
    # The embedding keeps only the rows of the config's vocabulary (Gemma 3 checkpoints may carry more).
    trim_embedding: bool = False
    # llama.cpp's converter writes this family's keys itself instead of its shared set (Phi-3).
    own_keys: bool = False
    # Which of llama.cpp's SentencePiece vocabulary readers the family goes through: "generic" or "phi3".
    spm_reader: str = "generic"
    # Tokenizer metadata rules of llama.cpp's converter beyond the vocabulary itself: "llama" (LlamaModel's:
    # add_prefix_space copied from tokenizer_config.json, no BOS for 49152-token vocabularies), "gemma3"
    # (add_space_prefix false) or None.
    vocab_rules: str | None = None
    # Config checks (names in streaming.CONFIG_CHECKS): what llama.cpp's graph assumes and we verify.
    checks: tuple[str, ...] = ()

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


@dataclass(frozen=True)
class Family:
    gguf: GGUFSpec | None = None     # None: llama.cpp's converter writes the GGUF
    awq: LayerSpec | None = None     # None: AWQ refuses the family


# --- AWQ layer tables: which linears share an input, what precedes them, what the scale search runs ---

# Separate q/k/v projections: the norm before attention feeds q/k/v, v feeds o (when their widths match).
ATTENTION_GROUPS = (
    Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    Group("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", when_shapes_match=True),
)


def _swiglu_groups(norm: str) -> tuple[Group, ...]:
    """A gated MLP after `norm`: the norm feeds gate/up, up feeds down."""
    return (Group(norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))


AWQ_LLAMA = LayerSpec(
    layers_path="model.layers",
    groups=ATTENTION_GROUPS + _swiglu_groups("post_attention_layernorm"),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

# Qwen3 and SmolLM3 are Llama's table: Qwen3's q/k norms act on q_proj/k_proj outputs, which input scales leave
# unchanged (they stay fp16 like every norm); SmolLM3's layers without RoPE change nothing here either.

# Gemma 3: four norms per layer. input_layernorm feeds q/k/v, pre_feedforward_layernorm feeds gate/up; the
# post-attention and post-feedforward norms act on outputs and precede no linear. Norms compute (1 + w) · x̂.
AWQ_GEMMA3 = replace(AWQ_LLAMA, groups=ATTENTION_GROUPS + _swiglu_groups("pre_feedforward_layernorm"),
                     norm_offset=1.0, scaled_embeddings=True)

# Phi-3 / Phi-4: fused qkv_proj (rows q, k, v) and gate_up_proj (rows gate, up: Phi3MLP chunks gate first).
# o_proj's scales go into v's rows only without grouped-query attention (q, k, v of equal height).
AWQ_PHI3 = LayerSpec(
    layers_path="model.layers",
    groups=(
        Group("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        Group("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", when_shapes_match=True,
              fused_parts=3),
        Group("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        Group("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", fused_parts=2),
    ),
    no_clip=("self_attn.qkv_proj",),
)


def _awq_moe(experts: Experts, router: str, block: str, **extra: Any) -> LayerSpec:
    """Mixture of experts (transformers writes Qwen3-MoE's num_experts as num_local_experts): the post-attention
    norm feeds the router and every expert's gate/up (one scale search over the whole block); the router stays
    16-bit with the scales multiplied into its input columns. Each expert's down reads its own up."""
    e = f"{experts.path}.{{e}}."
    return LayerSpec(
        layers_path="model.layers",
        groups=ATTENTION_GROUPS + (
            Group("post_attention_layernorm", (e + experts.gate, e + experts.up), block, input=block,
                  compensate=(router,)),
            Group(e + experts.up, (e + experts.down,), e + experts.down),
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
        experts=experts,
        **extra,
    )


AWQ_QWEN3_MOE = _awq_moe(Experts("mlp.experts", ("num_experts", "num_local_experts"), "gate_proj", "up_proj",
                                 "down_proj"),
                         router="mlp.gate", block="mlp",
                         not_converted=("lm_head", "mlp.gate"))   # "gate" alone would match every gate_proj
# transformers calls Mixtral's block_sparse_moe "mlp"; the checkpoint (and vLLM) keep the old name.
AWQ_MIXTRAL = _awq_moe(Experts("mlp.experts", ("num_local_experts",), "w1", "w3", "w2"),
                       router="mlp.gate", block="mlp",
                       not_converted=("lm_head", "block_sparse_moe.gate", "mlp.gate"),
                       renames=(("mlp.", "block_sparse_moe."),))

# llama.cpp's LlamaModel adds these to the shared keys (LLAMA and families derived from it).
LLAMA_KEYS = ("vocab_size", "rope_dimension_count")

# --- the registry ---

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(
        gguf=GGUFSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, extra_keys=LLAMA_KEYS, vocab_rules="llama"),
        awq=AWQ_LLAMA,
    ),
    "MistralForCausalLM": Family(
        gguf=GGUFSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, extra_keys=LLAMA_KEYS, vocab_rules="llama"),
        awq=AWQ_LLAMA,
    ),
    "Qwen2ForCausalLM": Family(
        gguf=GGUFSpec(gguf.MODEL_ARCH.QWEN2, permute_qk=False, checks=("no_pooling",)),
        awq=AWQ_LLAMA,   # q/k/v biases are divided with the weights' rows where they precede a group
    ),
    "Qwen3ForCausalLM": Family(
        gguf=GGUFSpec(gguf.MODEL_ARCH.QWEN3, permute_qk=False, checks=("no_pooling", "not_reranker")),
        awq=AWQ_LLAMA,
    ),
    "Gemma3ForCausalLM": Family(
        gguf=GGUFSpec(gguf.MODEL_ARCH.GEMMA3, permute_qk=False, norm_shift=1.0, trim_embedding=True,
                      vocab_rules="gemma3", extra_keys=("gemma3",), checks=("gemma3_attention",)),
        awq=AWQ_GEMMA3,
    ),
    "Phi3ForCausalLM": Family(   # Phi-3 and Phi-4
        gguf=GGUFSpec(gguf.MODEL_ARCH.PHI3, permute_qk=False, own_keys=True, extra_keys=("phi3",),
                      spm_reader="phi3", checks=("no_long_rope",)),
        awq=AWQ_PHI3,
    ),
    "SmolLM3ForCausalLM": Family(
        gguf=GGUFSpec(gguf.MODEL_ARCH.SMOLLM3, permute_qk=True, extra_keys=LLAMA_KEYS,
                      vocab_rules="llama", checks=("smollm3_no_rope",)),
        awq=AWQ_LLAMA,
    ),
    "Qwen3MoeForCausalLM": Family(
        gguf=None,   # llama.cpp's converter
        awq=AWQ_QWEN3_MOE,
    ),
    "MixtralForCausalLM": Family(
        gguf=None,   # llama.cpp's converter
        awq=AWQ_MIXTRAL,
    ),
}


def _names(config: dict[str, Any]) -> list[str]:
    return list(config.get("architectures") or [])


def shown(config: dict[str, Any]) -> str:
    """A config's architecture names for a message (its model_type when it names none)."""
    return ", ".join(_names(config)) or f"model_type={config.get('model_type', 'unknown')}"


def first_known(config: dict[str, Any], known: Any) -> str | None:
    """The first of a config's architecture names that is in `known`."""
    return next((name for name in _names(config) if name in known), None)


def supported(method: str) -> list[str]:
    """The architectures with an entry for `method` ("gguf" or "awq")."""
    return sorted(name for name, fam in FAMILIES.items() if getattr(fam, method) is not None)


def arch_of(config: dict[str, Any]) -> tuple[str, GGUFSpec]:
    """The HF architecture name and our converter's spec for it, or UnsupportedArchitectureError."""
    name = first_known(config, supported("gguf"))
    if name is not None:
        return name, FAMILIES[name].gguf   # type: ignore[return-value]
    raise UnsupportedArchitectureError(
        f"Architecture {shown(config)} is not in QuantSpace's own GGUF converter "
        f"(it has: {', '.join(supported('gguf'))})."
    )


def awq_spec(config: dict[str, Any]) -> LayerSpec:
    """The AWQ layer table of a model's config.json, or UnsupportedArchitectureError naming what AWQ supports."""
    name = first_known(config, supported("awq"))
    if name is not None:
        return FAMILIES[name].awq   # type: ignore[return-value]
    raise UnsupportedArchitectureError(
        f"AWQ does not support {shown(config)} yet (supported: {', '.join(supported('awq'))})."
    )


def load_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise MissingFileError(f"No config.json in {model_dir}; not a Hugging Face model folder.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MissingFileError(f"config.json is not valid JSON: {exc}") from None
