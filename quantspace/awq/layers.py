"""The shape of an AWQ layer table: which linears share an input, what precedes them, what to run.

The tables themselves are data in the family registry, quantspace/archs.py. Names are module paths inside one
decoder layer as transformers builds it; `LayerSpec.renames` maps them to the checkpoint's names where the two
differ (Mixtral's `block_sparse_moe` is `mlp` in transformers). In a mixture-of-experts table, "{e}" in a name
stands for every expert: a group whose `prev` holds "{e}" is repeated per expert, a group whose linears hold it
reads one input shared by all experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from ..errors import CorruptWeightsError

EXPERT = "{e}"


@dataclass(frozen=True)
class Group:
    """Linears that read the same input; their input channels get one set of AWQ scales."""
    prev: str                  # the norm or linear producing that input: the scales are divided out of it
    linears: tuple[str, ...]   # module paths inside the decoder layer
    inspect: str               # module whose output the scale search preserves (runs on the linears' input)
    when_shapes_match: bool = False   # only when prev's output width equals the linears' input width (o ← v)
    # prev is a fused linear of this many equal blocks (q,k,v → 3; gate,up → 2) and the linears read the
    # last one (v; up). With when_shapes_match the blocks must be equal (no grouped-query attention).
    fused_parts: int = 1
    input: str = ""            # module whose first input is the group's input (default: linears[0])
    # Modules that read the same input but stay 16-bit (an MoE router): their input columns are multiplied by
    # the scales, so what they compute is unchanged.
    compensate: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return self.input or self.linears[0]


@dataclass(frozen=True)
class Experts:
    """Where a mixture-of-experts layer keeps its experts, and each expert's linears as the checkpoint names
    them (transformers fuses them into 3-D parameters when it loads; AWQ works per expert)."""
    path: str                  # module path of the experts inside the layer ("mlp.experts")
    count: tuple[str, ...]     # config.json keys that may hold the number of experts (the first present)
    gate: str                  # the three linears of one expert: act(gate(x)) * up(x) → down
    up: str
    down: str


@dataclass(frozen=True)
class LayerSpec:
    layers_path: str           # where the decoder layers live in the CausalLM
    groups: tuple[Group, ...]
    no_clip: tuple[str, ...]   # linears whose weights are not clipped (q/k: their products go through softmax)
    embeddings: str = "model.embed_tokens.weight"   # the tensor that turns calibration tokens into hidden states
    rotary: str = "model.rotary_emb"                # the module that makes the layers' position embeddings
    # Matched by vLLM as substrings and by transformers as name suffixes: never a prefix of a quantized name.
    not_converted: tuple[str, ...] = ("lm_head",)
    norm_offset: float = 0.0   # norms compute (offset + weight) · x̂ (Gemma: 1)
    scaled_embeddings: bool = False   # embeddings are multiplied by √hidden_size (Gemma)
    experts: Experts | None = None
    renames: tuple[tuple[str, str], ...] = ()       # (module path prefix, checkpoint name prefix) in a layer

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized linear, "{e}" standing for each expert."""
        return tuple(name for g in self.groups for name in g.linears)

    def expand(self, config: dict[str, Any]) -> tuple[Group, ...]:
        """The groups with "{e}" replaced by each expert of this model."""
        n = self.expert_count(config)
        out: list[Group] = []
        for g in self.groups:
            if EXPERT in g.prev:
                out += [_for_expert(g, e) for e in range(n)]
            elif any(EXPERT in name for name in g.linears):
                out.append(replace(g, linears=tuple(name.replace(EXPERT, str(e)) for name in g.linears
                                                   for e in range(n))))
            else:
                out.append(g)
        return tuple(out)

    def expert_count(self, config: dict[str, Any]) -> int:
        if self.experts is None:
            return 0
        for key in self.experts.count:
            if config.get(key):
                return int(config[key])
        raise CorruptWeightsError(f"config.json gives no number of experts ({' or '.join(self.experts.count)}).")

    def stored(self, name: str) -> str:
        """The checkpoint's name of a path inside a layer."""
        for module, ckpt in self.renames:
            if name.startswith(module):
                return ckpt + name[len(module):]
        return name

    def module_name(self, full_name: str) -> str:
        """The transformers (module path) name of a full checkpoint tensor name."""
        prefix = self.layers_path + "."
        if not full_name.startswith(prefix):
            return full_name
        index, _, rest = full_name[len(prefix):].partition(".")
        for module, ckpt in self.renames:
            if rest.startswith(ckpt):
                rest = module + rest[len(ckpt):]
                break
        return f"{prefix}{index}.{rest}"


def _for_expert(g: Group, e: int) -> Group:
    def sub(name: str) -> str:
        return name.replace(EXPERT, str(e))
    return replace(g, prev=sub(g.prev), linears=tuple(sub(n) for n in g.linears), inspect=sub(g.inspect),
                   input=sub(g.input), compensate=tuple(sub(n) for n in g.compensate))


def spec_for(config: dict[str, Any]) -> LayerSpec:
    """The layer table of a model's config.json (from the registry in quantspace.archs)."""
    from ..archs import awq_spec

    return awq_spec(config)


def quantized_tensor_names(spec: LayerSpec, config: dict[str, Any]) -> list[str]:
    """Checkpoint names of the weights AWQ replaces (…q_proj.weight etc.)."""
    linears = [lin for g in spec.expand(config) for lin in g.linears]
    return [f"{spec.layers_path}.{i}.{spec.stored(lin)}.weight"
            for i in range(int(config["num_hidden_layers"])) for lin in linears]


@lru_cache(maxsize=1)
def _name_pattern() -> re.Pattern[str]:
    from ..archs import FAMILIES

    alternatives = set()
    for fam in FAMILIES.values():
        if fam.awq:
            for lin in fam.awq.linears:
                alternatives.add(re.escape(fam.awq.stored(lin)).replace(re.escape(EXPERT), r"\d+"))
    return re.compile(r"\.layers\.\d+\.(?:" + "|".join(sorted(alternatives)) + r")\.weight$")


def is_quantized_name(name: str) -> bool:
    """Whether a checkpoint tensor is one AWQ quantizes, by name alone (for size estimates from headers)."""
    return _name_pattern().search(name) is not None
