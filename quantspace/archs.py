"""The one registry of model families: what each needs for GGUF, AWQ and NF4, as data.

A new family is one entry in FAMILIES (plus its tests). NF4 needs no entry: bitsandbytes quantizes whatever
transformers loads, and its LoRA targets are read from the checkpoint (formats/nf4.py). A family without a
GGUF spec is converted by llama.cpp's own converter when llama.cpp knows it (converter/llama_cpp.py); one
without an AWQ table is refused by AWQ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .awq.layers import Group, LayerSpec
from .errors import MissingFileError, UnsupportedArchitectureError


# NF4's LoRA targets are the checkpoint's own decoder linears, listed in the order people write them.
LORA_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj",
              "down_proj")


@dataclass(frozen=True)
class GGUFSpec:
    """What our streaming converter needs to write a family exactly as llama.cpp's converter does."""
    gguf_arch: gguf.MODEL_ARCH
    # HF Llama/Mistral use "rotate half" RoPE; llama.cpp's LLAMA graph expects q/k rows interleaved.
    permute_qk: bool
    # Tensors in HF checkpoints that llama.cpp recomputes itself.
    skip_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


@dataclass(frozen=True)
class Family:
    gguf: GGUFSpec | None = None     # None: llama.cpp's converter writes the GGUF
    awq: LayerSpec | None = None     # None: AWQ refuses the family


# --- AWQ layer tables: which linears share an input, what precedes them, what the scale search runs ---

AWQ_LLAMA = LayerSpec(
    layers_path="model.layers",
    groups=(
        Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Group("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", when_shapes_match=True),
        Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

# --- the registry ---

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(
        gguf=GGUFSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        awq=AWQ_LLAMA,
    ),
    "MistralForCausalLM": Family(
        gguf=GGUFSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        awq=AWQ_LLAMA,
    ),
    "Qwen2ForCausalLM": Family(
        gguf=GGUFSpec(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
        awq=AWQ_LLAMA,   # q/k/v biases are divided with the weights' rows where they precede a group
    ),
}


def _names(config: dict[str, Any]) -> list[str]:
    return list(config.get("architectures") or [])


def _shown(config: dict[str, Any]) -> str:
    return ", ".join(_names(config)) or f"model_type={config.get('model_type', 'unknown')}"


def supported(method: str) -> list[str]:
    """The architectures with an entry for `method` ("gguf" or "awq")."""
    return sorted(name for name, fam in FAMILIES.items() if getattr(fam, method) is not None)


def arch_of(config: dict[str, Any]) -> tuple[str, GGUFSpec]:
    """The HF architecture name and our converter's spec for it, or UnsupportedArchitectureError."""
    for name in _names(config):
        spec = FAMILIES[name].gguf if name in FAMILIES else None
        if spec is not None:
            return name, spec
    raise UnsupportedArchitectureError(
        f"Architecture {_shown(config)} is not in QuantSpace's own GGUF converter "
        f"(it has: {', '.join(supported('gguf'))})."
    )


def awq_spec(config: dict[str, Any]) -> LayerSpec:
    """The AWQ layer table of a model's config.json, or UnsupportedArchitectureError naming what AWQ supports."""
    for name in _names(config):
        spec = FAMILIES[name].awq if name in FAMILIES else None
        if spec is not None:
            return spec
    raise UnsupportedArchitectureError(
        f"AWQ does not support {_shown(config)} yet (supported: {', '.join(supported('awq'))})."
    )


def load_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise MissingFileError(f"No config.json in {model_dir}; not a Hugging Face model folder.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MissingFileError(f"config.json is not valid JSON: {exc}") from None
