"""Per-architecture facts, as data. A new Llama-like architecture is one entry here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf

from .errors import UnsupportedArchitectureError


# The linear layers of a Llama-like decoder layer, in the order people list them (NF4's LoRA targets follow it).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: gguf.MODEL_ARCH
    # HF Llama/Mistral use "rotate half" RoPE; llama.cpp's LLAMA graph expects q/k rows interleaved.
    permute_qk: bool
    # Tensors in HF checkpoints that llama.cpp recomputes itself.
    skip_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}


def arch_of(config: dict[str, Any]) -> tuple[str, ArchSpec]:
    """The HF architecture name and its spec, or UnsupportedArchitectureError naming it."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    shown = ", ".join(names) or f"model_type={config.get('model_type', 'unknown')}"
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedArchitectureError(
        f"Architecture {shown} is not supported for GGUF yet (supported: {supported}); NF4 takes any "
        "transformers causal LM."
    )
