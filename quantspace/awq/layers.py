"""The shape of an AWQ layer table: which linears share an input, what precedes them, what to run.

The tables themselves are data in the family registry, quantspace/archs.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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


def spec_for(config: dict[str, Any]) -> LayerSpec:
    """The layer table of a model's config.json (from the registry in quantspace.archs)."""
    from ..archs import awq_spec

    return awq_spec(config)


def quantized_tensor_names(spec: LayerSpec, n_layers: int) -> list[str]:
    """HF names of the weights AWQ replaces (…q_proj.weight etc.)."""
    return [f"{spec.layers_path}.{i}.{lin}.weight" for i in range(n_layers) for lin in spec.linears]


def is_quantized_name(name: str) -> bool:
    """Whether a checkpoint tensor is one AWQ quantizes, by name alone (for size estimates from headers)."""
    from ..archs import FAMILIES

    suffixes = tuple({f".{lin}.weight" for fam in FAMILIES.values() if fam.awq for lin in fam.awq.linears})
    return ".layers." in name and name.endswith(suffixes)
