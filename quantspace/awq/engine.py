"""Layer-by-layer AWQ driver with a resumable state folder.

Only one decoder layer's weights and the calibration activations are on the device at a time: the model is a
skeleton on the meta device, and each layer is materialised from the safetensors files, searched, quantized,
packed, run once more (quantized) to give the next layer its input, and dropped.

State folder (one job):
  settings.json             what the job computes; a different job in the same folder starts over
  tokens.pt                 calibration token ids [samples, seqlen]
  layer-00007.safetensors   packed tensors of each finished layer (fp16 norms/biases, int32/fp16 AWQ tensors)
  hidden-00008.pt           the input of the next layer, written when a run stops before the end
  progress.json             {"next": 8}: layers below it are done
`run` stops when its time budget would be exceeded by one more layer; calling it again resumes.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..archs import load_config
from ..errors import CorruptWeightsError, UnsupportedArchitectureError
from ..weights import weight_files
from .layers import Group, LayerSpec, spec_for
from .moe import unfuse_model
from .pack import dequantize, pack_linear, quantize
from .search import apply_clip, fold_scale, search_clip, search_scale


@dataclass(frozen=True)
class Settings:
    group_size: int = 128
    n_samples: int = 128
    seqlen: int = 512
    device: str = "cpu"
    n_grid: int = 20
    clip_tokens: int = 512      # tokens the clip search looks at (as AWQ)
    chunk_tokens: int = 16384   # tokens per forward pass through a module

    @property
    def dtype(self) -> torch.dtype:
        # CUDA: fp16, the dtype AWQ kernels run in. CPU: float32, exact and deterministic.
        return torch.float16 if self.device.startswith("cuda") else torch.float32


# --------------------------------------------------------------------------- state folder


def prepare(state_dir: Path, settings: Settings, tokens: list[list[int]]) -> None:
    """Start a job in state_dir, unless the same job is already there (then it resumes)."""
    wanted = asdict(settings)
    wanted["tokens"] = len(tokens)
    marker = state_dir / "settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == wanted and (state_dir / "tokens.pt").is_file():
        return
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    _save_atomic(torch.tensor(tokens, dtype=torch.long), state_dir / "tokens.pt")
    _write_json(state_dir / "progress.json", {"next": 0})
    _write_json(marker, wanted)


def load_settings(state_dir: Path) -> Settings:
    data = json.loads((state_dir / "settings.json").read_text())
    data.pop("tokens", None)
    return Settings(**data)


def next_layer(state_dir: Path) -> int:
    return int(json.loads((state_dir / "progress.json").read_text())["next"])


def layer_file(state_dir: Path, i: int) -> Path:
    return state_dir / f"layer-{i:05d}.safetensors"


def _hidden_file(state_dir: Path, i: int) -> Path:
    return state_dir / f"hidden-{i:05d}.pt"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- source tensors


class SourceTensors:
    """Reads named tensors from the source's safetensors files (memory-mapped, one at a time)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self._files = {}
        self.where: dict[str, Any] = {}
        for path in weight_files(model_dir):
            handle = safe_open(str(path), framework="pt")
            self._files[path] = handle
            for name in handle.keys():
                self.where[name] = handle

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CorruptWeightsError(f"Tensor {name} is missing from the model's safetensors files.")
        return self.where[name].get_tensor(name)

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.where if n.startswith(prefix)]


def _skeleton(config: dict[str, Any], spec: LayerSpec) -> nn.Module:
    """The CausalLM on the meta device (no memory), with SDPA attention (causal without a mask) and one linear
    per expert where transformers fuses them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return unfuse_model(model.eval(), spec.layers_path, spec.experts)


def _materialise(layer: nn.Module, prefix: str, spec: LayerSpec, src: SourceTensors, device: torch.device,
                 dtype: torch.dtype) -> nn.Module:
    """The meta-device layer with its tensors read from the source, on the device."""
    state = {name: src.get(prefix + spec.stored(name)).to(device, dtype) for name in layer.state_dict()}
    layer.load_state_dict(state, assign=True)
    return layer


# --------------------------------------------------------------------------- the run


def _chunks(x: torch.Tensor, tokens: int) -> Iterator[torch.Tensor]:
    per = max(1, tokens // x.shape[1]) if x.dim() == 3 else tokens   # [samples, seqlen, width] or [tokens, width]
    for lo in range(0, x.shape[0], per):
        yield x[lo:lo + per]


class _Runner:
    """Runs modules of the current layer over activations [samples, seqlen, width] in bounded chunks."""

    def __init__(self, position_embeddings: Any, chunk_tokens: int):
        self.pe = position_embeddings   # of the current layer (they differ by layer type in Gemma 3)
        self.chunk_tokens = chunk_tokens

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        takes_pe = "position_embeddings" in inspect.signature(module.forward).parameters
        outs = []
        with torch.no_grad():
            for part in _chunks(x, self.chunk_tokens):
                y = module(part, position_embeddings=self.pe, attention_mask=None) if takes_pe else module(part)
                outs.append(y[0] if isinstance(y, tuple) else y)
        return torch.cat(outs)


def _capture_inputs(layer: nn.Module, names: list[str], x: torch.Tensor, run: _Runner) -> dict[str, torch.Tensor]:
    """The inputs each named module sees when the layer runs over x (an expert that no token reached: none)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [layer.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: seen[n].append(args[0].detach())) for n in names]
    try:
        run(layer, x)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(parts) for n, parts in seen.items() if parts}


def _check_layers(layers: nn.ModuleList, groups: tuple[Group, ...]) -> None:
    """Every layer has every module of the table (on the meta skeleton: before any work)."""
    for i, layer in enumerate(layers):
        for grp in groups:
            for name in (grp.prev, *grp.linears, grp.inspect, *grp.compensate):
                try:
                    layer.get_submodule(name)
                except AttributeError:
                    raise UnsupportedArchitectureError(
                        f"Layer {i} has no {name}: AWQ supports this family only when every layer has the same "
                        "structure (mixture-of-experts models: every layer a mixture of experts).") from None


def quantize_layer(layer: nn.Module, spec: LayerSpec, groups: tuple[Group, ...], x: torch.Tensor, run: _Runner,
                   settings: Settings) -> dict[str, torch.Tensor]:
    """Search, fold, clip and quantize one decoder layer in place (its linears become dequantized weights);
    returns the packed AWQ tensors by name inside the layer (module paths; `spec.stored` gives the
    checkpoint's). `groups`: spec.expand(config)."""
    g = settings.group_size
    feats = _capture_inputs(layer, list(dict.fromkeys(grp.source for grp in groups)), x, run)
    plans = []
    for grp in groups:     # every search sees the unscaled layer, as AWQ
        prev = layer.get_submodule(grp.prev)
        linears = [layer.get_submodule(n) for n in grp.linears]
        if grp.when_shapes_match and prev.weight.shape[0] != grp.fused_parts * linears[0].weight.shape[1]:
            continue
        if grp.source not in feats:   # an expert no calibration token reached: plain round-to-nearest
            continue
        module = layer.get_submodule(grp.inspect)
        s = search_scale(linears, feats[grp.source], lambda a, m=module: run(m, a), g, settings.n_grid)
        plans.append((grp, prev, linears + [layer.get_submodule(n) for n in grp.compensate], s))
    for grp, prev, readers, s in plans:
        fold_scale(prev, readers, s, spec.norm_offset)
        feats[grp.source] = feats[grp.source] / s.to(x.dtype)
    packed: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for grp in groups:
            for name in grp.linears:
                lin = layer.get_submodule(name)
                if name not in spec.no_clip and grp.source in feats:
                    apply_clip(lin, search_clip(lin.weight, feats[grp.source], g, settings.n_grid,
                                                n_tokens=settings.clip_tokens))
                q, z, s = quantize(lin.weight, g)
                for suffix, t in pack_linear(q, z, s).items():
                    packed[f"{name}.{suffix}"] = t.cpu()
                lin.weight.copy_(dequantize(q, z, s, lin.weight.dtype))
                if lin.bias is not None:
                    packed[f"{name}.bias"] = lin.bias.detach().half().cpu()
    quantized = {name for grp in groups for name in grp.linears}
    for name, p in layer.named_parameters():   # norms (with the folded scales) stay fp16
        if name.rpartition(".")[0] not in quantized:
            packed[name] = p.detach().half().cpu()
    return packed


def _position_embeddings(model: nn.Module, spec: LayerSpec, x: torch.Tensor,
                         seqlen: int) -> Callable[[int], Any]:
    """Layer index → that layer's position embeddings (per layer type where the rotary module takes one)."""
    rotary = type(model.get_submodule(spec.rotary))(model.config).to(x.device)   # buffers are computed, not stored
    positions = torch.arange(seqlen, device=x.device).unsqueeze(0)
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        pe = rotary(x[:1], positions)
        return lambda i: pe
    types = list(model.config.layer_types)
    by_type = {t: rotary(x[:1], positions, layer_type=t) for t in set(types)}
    return lambda i: by_type[types[i]]


def layer_input(state_dir: Path, first: int, src: SourceTensors, spec: LayerSpec, config: dict[str, Any],
                dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The input of layer `first`: the calibration tokens' embeddings, or the hidden state a stopped run left."""
    if first > 0:
        return torch.load(_hidden_file(state_dir, first), map_location=dev)
    tokens = torch.load(state_dir / "tokens.pt")
    table = src.get(spec.embeddings)
    x = nn.functional.embedding(tokens, table)
    if spec.scaled_embeddings:   # as transformers: the scale in the table's dtype
        x = x * torch.tensor(float(config["hidden_size"]) ** 0.5, dtype=table.dtype)
    return x.to(dev, dtype)


def run(model_dir: Path, state_dir: Path, budget_s: float | None = None,
        progress: Callable[[int, int], None] | None = None) -> bool:
    """Quantize layers from where the state folder stands; True when every layer is done.

    Stops before a layer that would not finish within budget_s (the first layer always runs), saving what the
    next call needs. Top-level with plain arguments, so a ZeroGPU runner can call it in another process.
    """
    from safetensors.torch import save_file

    start = time.monotonic()
    settings = load_settings(state_dir)
    config = load_config(model_dir)
    spec = spec_for(config)
    n_layers = int(config["num_hidden_layers"])
    first = next_layer(state_dir)
    if first >= n_layers:
        return True
    dev, dtype = torch.device(settings.device), settings.dtype
    src = SourceTensors(model_dir)
    model = _skeleton(config, spec)
    groups = spec.expand(config)
    x = layer_input(state_dir, first, src, spec, config, dev, dtype)
    pe_of = _position_embeddings(model, spec, x, settings.seqlen)
    runner = _Runner(None, settings.chunk_tokens)
    layers = model.get_submodule(spec.layers_path)
    _check_layers(layers, groups)
    slowest = 0.0
    i = first
    while i < n_layers:
        spent = time.monotonic() - start
        if budget_s is not None and i > first and spent + slowest * 1.2 > budget_s:
            break
        t0 = time.monotonic()
        layer = _materialise(layers[i], f"{spec.layers_path}.{i}.", spec, src, dev, dtype)
        runner.pe = pe_of(i)
        packed = {spec.stored(k): v for k, v in quantize_layer(layer, spec, groups, x, runner, settings).items()}
        x = runner(layer, x)   # the quantized layer's output is the next layer's input
        tmp = layer_file(state_dir, i).with_suffix(".tmp")
        save_file(packed, str(tmp))
        os.replace(tmp, layer_file(state_dir, i))
        layers[i] = layer.to("meta")
        del layer, packed
        i += 1
        if progress is not None:
            progress(i, n_layers)
        slowest = max(slowest, time.monotonic() - t0)
    if i < n_layers:
        _save_atomic(x.cpu(), _hidden_file(state_dir, i))
    _write_json(state_dir / "progress.json", {"next": i})
    if first > 0:
        _hidden_file(state_dir, first).unlink(missing_ok=True)
    return i >= n_layers
