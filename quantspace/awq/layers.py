"""Per-architecture AWQ mapping, as data: which linears share an input, what precedes them, what to run.

A new architecture whose decoder layer has the same structure is one entry in ARCHITECTURES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Group:
    """Linears that read the same input; their input channels get one set of AWQ scales."""
    prev: str                  # the norm or linear producing that input: the scales are divided out of it
    linears: tuple[str, ...]   # module paths inside the decoder layer
    inspect: str               # module whose output the scale search preserves (runs on the linears' input)
    when_shapes_match: bool = False   # only when prev's output width equals the linears' input width (o ← v)


@dataclass(frozen=True)
class LayerSpec:
    layers_path: str           # where the decoder layers live in the CausalLM
    groups: tuple[Group, ...]
    no_clip: tuple[str, ...]   # linears whose weights are not clipped (q/k: their products go through softmax)
    embeddings: str = "model.embed_tokens.weight"   # the tensor that turns calibration tokens into hidden states
    rotary: str = "model.rotary_emb"                # the module that makes the layers' position embeddings
    not_converted: tuple[str, ...] = ("lm_head",)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)


LLAMA = LayerSpec(
    layers_path="model.layers",
    groups=(
        Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Group("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", when_shapes_match=True),
        Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

ARCHITECTURES: dict[str, LayerSpec] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,   # q/k/v biases are divided with the weights' rows where they precede a group
}


def spec_for(config: dict[str, Any]) -> LayerSpec:
    """The layer table of a model's config.json, or UnsupportedArchitectureError naming what is supported."""
    for name in config.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    shown = ", ".join(config.get("architectures") or []) or f"model_type={config.get('model_type', 'unknown')}"
    raise UnsupportedArchitectureError(
        f"AWQ does not support {shown} yet (supported: {', '.join(sorted(ARCHITECTURES))})."
    )


def quantized_tensor_names(spec: LayerSpec, n_layers: int) -> list[str]:
    """HF names of the weights AWQ replaces (…q_proj.weight etc.)."""
    return [f"{spec.layers_path}.{i}.{lin}.weight" for i in range(n_layers) for lin in spec.linears]


_LINEAR_SUFFIXES = tuple(sorted({f".{lin}.weight" for spec in ARCHITECTURES.values() for lin in spec.linears}))


def is_quantized_name(name: str) -> bool:
    """Whether a checkpoint tensor is one AWQ quantizes, by name alone (for size estimates from headers)."""
    return ".layers." in name and name.endswith(_LINEAR_SUFFIXES)
