"""Mixture-of-experts layers with one nn.Linear per expert, as the checkpoint stores them.

transformers fuses a layer's experts into 3-D parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]) when it
builds a model; AWQ searches, quantizes and stores each expert's linears on their own, so the engine and the
dequantized models swap the fused module for this one. It computes what the fused one does.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Experts


class Expert(nn.Module):
    def __init__(self, names: Experts, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: nn.Module):
        super().__init__()
        self.names = names
        for name, lin in ((names.gate, gate), (names.up, up), (names.down, down)):
            self.add_module(name, lin)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.names
        gate, up, down = (self.get_submodule(k) for k in (n.gate, n.up, n.down))
        return down(self.act(gate(x)) * up(x))


class PerExpert(nn.Module):
    """Children "0", "1", … are the experts; called as transformers calls its fused experts module."""

    def __init__(self, experts: list[Expert]):
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = self.get_submodule(str(e))(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return lin


def unfuse(layer: nn.Module, names: Experts) -> None:
    """Replace the layer's fused experts (meta or loaded) by PerExpert with the same weights."""
    try:
        fused = layer.get_submodule(names.path)
    except AttributeError:   # a dense layer: the engine refuses such models with the reason
        return
    if isinstance(fused, PerExpert):
        return
    gate_up, down = fused.gate_up_proj, fused.down_proj
    n, two_i, hidden = gate_up.shape
    if down.shape != (n, hidden, two_i // 2):
        raise ValueError(f"unexpected fused expert shapes {tuple(gate_up.shape)} and {tuple(down.shape)}")
    i = two_i // 2
    # transformers splits gate_up's output in two halves: gate first, then up.
    experts = [Expert(names, _linear(gate_up[e, :i]), _linear(gate_up[e, i:]), _linear(down[e]), fused.act_fn)
               for e in range(n)]
    parent, _, child = names.path.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, child, PerExpert(experts))


def unfuse_model(model: nn.Module, layers_path: str, names: Experts | None) -> nn.Module:
    if names is not None:
        for layer in model.get_submodule(layers_path):
            unfuse(layer, names)
    return model
