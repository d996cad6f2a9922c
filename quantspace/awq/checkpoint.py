"""The AWQ GEMM checkpoint folder: writing it from a finished state folder, reading it back dequantized."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..formats import copy_source_files
from ..weights import F16_MAX
from ..archs import load_config
from ..reference import SourceWeights
from .engine import SourceTensors, layer_file, load_settings
from .layers import LayerSpec, quantized_tensor_names, spec_for
from .moe import unfuse_model
from .pack import fake_quantize, unpack_linear

MAX_SHARD_BYTES = 4 * 1024**3
QUANT_SUFFIXES = ("qweight", "qzeros", "scales")


def quantization_config(spec: LayerSpec, group_size: int) -> dict[str, Any]:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": list(spec.not_converted)}


def _fp16(t: torch.Tensor) -> torch.Tensor:
    # Saturate instead of writing inf for bf16/fp32 values beyond fp16's range.
    return t.float().clamp(-F16_MAX, F16_MAX).half() if t.dtype != torch.float16 else t


def _shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def write_checkpoint(model_dir: Path, state_dir: Path, out_dir: Path,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple[list[Path], list[Path]]:
    """(weight files, other files) of the checkpoint in out_dir, from a finished state folder.

    Each file is written under a temporary name and renamed, so a failure leaves no half-written file.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(model_dir)
    spec = spec_for(config)
    settings = load_settings(state_dir)
    prefix = spec.layers_path + "."
    src = SourceTensors(model_dir)
    # Plan shards by size first (names and byte counts only), then write one shard at a time.
    items: list[tuple[str, Any, int]] = []    # (name, where: source name or layer file, bytes)
    for name in src.where:
        if not name.startswith(prefix) and not name.endswith("rotary_emb.inv_freq"):
            shape = src.where[name].get_slice(name).get_shape()
            items.append((name, ("source", name), 2 * int(torch.Size(shape).numel())))
    for i in range(int(config["num_hidden_layers"])):
        path = layer_file(state_dir, i)
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                nbytes = int(torch.Size(shape).numel()) * (4 if key.endswith(("qweight", "qzeros")) else 2)
                items.append((f"{prefix}{i}.{key}", ("layer", path, key), nbytes))
    shards: list[list[tuple[str, Any, int]]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[2]
    names = _shard_names(len(shards))
    weights, weight_map = [], {}
    for shard, fname in zip(shards, names):
        tensors = {}
        for name, where, _ in shard:
            if where[0] == "source":
                tensors[name] = _fp16(src.get(where[1])).contiguous()
            else:
                with safe_open(str(where[1]), framework="pt") as f:
                    tensors[name] = f.get_tensor(where[2])
            weight_map[name] = fname
        weights.append(_save(tensors, out_dir / fname, save_file))
    extra = []
    stale_index = out_dir / "model.safetensors.index.json"
    if len(shards) == 1 and stale_index.is_file():   # from an earlier sharded run into this folder
        stale_index.unlink()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i[2] for i in items)}, "weight_map": weight_map}
        extra.append(_write_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2)))
    config = dict(config)
    config["quantization_config"] = quantization_config(spec, settings.group_size)
    config["torch_dtype"] = "float16"
    if "dtype" in config:
        config["dtype"] = "float16"
    extra.append(_write_text(out_dir / "config.json", json.dumps(config, indent=2)))
    extra += copy_source_files(model_dir, out_dir)
    return weights, extra


def _save(tensors: dict[str, torch.Tensor], path: Path, save_file: Any) -> Path:
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def dequantized_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in float32, AWQ linears as their dequantized weight (q − z)·s."""
    from safetensors.torch import load_file

    raw: dict[str, torch.Tensor] = {}
    index = ckpt_dir / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    for name in names:
        raw.update(load_file(str(ckpt_dir / name)))
    state = {}
    for name, t in raw.items():
        base, _, suffix = name.rpartition(".")
        if suffix == "qweight":
            state[base + ".weight"] = unpack_linear(t, raw[base + ".qzeros"], raw[base + ".scales"])
        elif suffix not in QUANT_SUFFIXES:
            state[name] = t.float()
    return state


class CheckpointWeights(SourceWeights):
    """The AWQ checkpoint's tensors for the layer-by-layer walk (quantspace.reference): each quantized linear's
    weight dequantized, (q − z)·s, when the walk asks for it; everything else as stored (fp16), in float32.
    The same numbers as dequantized_model, one layer in memory at a time."""

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        base = name.removesuffix(".weight")
        if base != name and base + ".qweight" in self.entries:
            packed = (self.raw(f"{base}.{suffix}") for suffix in QUANT_SUFFIXES)
            return unpack_linear(*packed).to(device)
        return super().get(name, device)


class RoundedWeights(SourceWeights):
    """The source as the round-to-nearest baseline sees it, for the layer-by-layer walk: every tensor through
    fp16 (as the checkpoint stores it), each linear AWQ quantizes fake-quantized on the same grid and group,
    no search. The same numbers as rtn_model, one layer in memory at a time."""

    def __init__(self, model_dir: Path, group_size: int):
        super().__init__(model_dir)
        config = load_config(model_dir)
        self.group_size = group_size
        self.quantized = set(quantized_tensor_names(spec_for(config), config))

    def rows(self, name: str, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        return _fp16(super().rows(name, lo, hi, device)).float()

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        w = super().get(name, device)
        return fake_quantize(w, self.group_size) if name in self.quantized else w


def _plain_model(config: dict[str, Any], spec: LayerSpec) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("quantization_config",)})
    return unfuse_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), spec.layers_path, spec.experts)


def dequantized_model(ckpt_dir: Path) -> Any:
    """A float32 transformers model whose weights are exactly what the AWQ checkpoint stores, dequantized (mixture
    of experts: one linear per expert, the same function as transformers' fused experts)."""
    config = load_config(ckpt_dir)
    spec = spec_for(config)
    model = _plain_model(config, spec)
    state = {spec.module_name(k): v for k, v in dequantized_state(ckpt_dir).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


def rtn_model(model_dir: Path, group_size: int) -> Any:
    """The source with plain round-to-nearest int4 (same group size and grid, no AWQ search), float32."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_dir)
    spec = spec_for(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    unfuse_model(model, spec.layers_path, spec.experts)
    linears = [name for grp in spec.expand(config) for name in grp.linears]
    with torch.no_grad():
        for p in model.parameters():      # everything else is fp16 in the AWQ checkpoint too
            p.copy_(_fp16(p).float())
        layers = model.get_submodule(spec.layers_path)
        for layer in layers:
            for name in linears:
                lin = layer.get_submodule(name)
                lin.weight.copy_(fake_quantize(lin.weight, group_size))
    return model.eval()
