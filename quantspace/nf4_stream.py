"""A bitsandbytes 4-bit checkpoint written while the source is read, one tensor at a time.

transformers' `from_pretrained(quantization_config=BitsAndBytesConfig(...))` + `save_pretrained` holds the whole
model in memory; here the model exists only as a skeleton on the meta device (built and converted by transformers'
own bitsandbytes quantizer, so the same modules become Linear4bit), each source tensor is read, quantized or cast
as transformers would, and appended to the shard being written. The files hold the same tensors, byte for byte,
as transformers' save_pretrained on the same device; a source whose tensor names need transformers' renaming
(e.g. a multimodal checkpoint) is not streamable and `stream_quantize` says so by returning None.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .weights import TORCH_DTYPES

SHARD_BYTES = 2 * 1024**3        # a shard is closed once its data reaches this size
# torch dtype name → safetensors' (the reverse of what weights.read_tensor reads)
DTYPE_NAMES = {torch_name: name for name, torch_name in TORCH_DTYPES.items()}


def skeleton(model_dir: str, config: dict[str, Any], dtype: Any) -> Any:
    """The model on the meta device with transformers' bitsandbytes module replacement applied."""
    import torch
    import transformers
    from transformers import AutoConfig, BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    from .archs import load_config
    from .multimodal import auto_class_name

    hf_config = AutoConfig.from_pretrained(model_dir)
    auto = getattr(transformers, auto_class_name(load_config(Path(model_dir))) or "AutoModelForCausalLM")
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(**config), pre_quantized=False)
    hf_config.quantization_config = quantizer.quantization_config
    with torch.device("meta"):
        model = auto.from_config(hf_config, dtype=dtype)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None,
                                   use_kernels=False)
    model.tie_weights()
    return model


def stream_quantize(model_dir: str, out: str, config: dict[str, Any], device: str,
                    shard_bytes: int | None = None) -> dict[str, Any] | None:
    """Write the 4-bit checkpoint of `model_dir` to `out` reading one tensor at a time; facts as quantize_folder
    returns them, or None (nothing written) when the source's names are not the model's own."""
    import torch
    from bitsandbytes.functional import quantize_4bit
    from bitsandbytes.nn import Linear4bit

    from .weights import all_entries, read_tensor

    dtype = getattr(torch, config["bnb_4bit_compute_dtype"])
    model = skeleton(model_dir, config, dtype)
    expected = model.state_dict()
    kept_names = dict(model.named_parameters())   # one name per tied group: the one save_pretrained keeps
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(kept_names)
    entries = all_entries(Path(model_dir))
    names = {e.name for e in entries}
    if not names <= set(expected) - tied or not (set(kept_names) | persistent_buffers(model)) <= names:
        return None
    fp32 = fp32_rule(model, dtype)

    Path(out).mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(Path(out), shard_bytes or SHARD_BYTES)
    quantized = unquantized = 0
    footprint = sum(b.nelement() * b.element_size() for b in model.buffers())   # buffers as the loaded model has
    for e in entries:
        name = e.name
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = read_tensor(e)
        if isinstance(module, Linear4bit) and leaf != "bias":
            w = tensor.to(device=device, dtype=dtype)
            if module.source_cls.__name__ == "Conv1D":   # GPT-2 style layers store the weight transposed
                w = w.T
            p = module.weight
            packed, state = quantize_4bit(w.contiguous(), blocksize=p.blocksize,
                                          compress_statistics=p.compress_statistics,
                                          quant_type=p.quant_type, quant_storage=p.quant_storage)
            del w
            writer.add(name, packed)
            for key, value in state.as_dict(packed=True).items():
                writer.add(f"{name}.{key}", value)
            footprint += packed.nelement() * packed.element_size()
            quantized += 1
        else:
            target = fp32(name) or expected[name].dtype   # the skeleton holds what transformers casts to
            value = tensor.to(device=device, dtype=target)
            writer.add(name, value)
            if name in kept_names:
                footprint += value.nelement() * value.element_size()
                unquantized += value.nelement() * value.element_size()
            del value
        del tensor
    writer.close(total_parameters=sum(p.numel() for p in kept_names.values()))
    write_config(model, Path(out), dtype)
    return {"memory_footprint_bytes": int(footprint), "quantized_layers": quantized,
            "unquantized_bytes": int(unquantized)}


def persistent_buffers(model: Any) -> set[str]:
    return {n for n in model.state_dict() if n not in dict(model.named_parameters(remove_duplicate=False))}


def fp32_rule(model: Any, dtype: Any) -> Any:
    """name → torch.float32 where transformers' keep-in-fp32 plan (`_keep_in_fp32_modules[_strict]`) keeps the
    tensor in float32, else None; the same glob matching transformers applies on load."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype)
    if not plan:
        return lambda name: None
    alternation, by_group, _ = build_glob_alternation(list(plan))

    def rule(name: str) -> Any:
        match = alternation.search(name)
        return plan[by_group[match.lastgroup]] if match else None

    return rule


def write_config(model: Any, out: Path, dtype: Any) -> None:
    """config.json as save_pretrained writes it: the class, the dtype and the quantization_config."""
    config = model.config
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)


class ShardWriter:
    """safetensors shards written as tensors arrive. Each shard's data goes to one scratch file per element size
    until the shard is full; closing it writes the header and then the scratch files, widest elements first, so
    memory never holds more than the tensor at hand."""

    def __init__(self, out: Path, limit: int):
        self.out, self.limit = out, limit
        self.shards: list[dict[str, Any]] = []   # per finished shard: its temporary name and tensor names
        self.total = 0
        self._open()

    def _open(self) -> None:
        self.parts: dict[int, Any] = {}
        self.entries: dict[int, list[tuple[str, str, list[int], int]]] = {}
        self.size = 0

    def add(self, name: str, tensor: Any) -> None:
        import torch

        tensor = tensor.detach().to("cpu").contiguous()
        width = tensor.element_size()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        if width not in self.parts:
            self.parts[width] = open(self.out / f".part-{len(self.shards)}-{width}", "w+b")
            self.entries[width] = []
        self.parts[width].write(data.data)
        self.entries[width].append((name, DTYPE_NAMES[str(tensor.dtype).removeprefix("torch.")],
                                    list(tensor.shape), data.nbytes))
        self.size += data.nbytes
        if self.size >= self.limit:
            self._finish()

    def _finish(self) -> None:
        if not self.parts:
            return
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for width in sorted(self.entries, reverse=True):
            for name, dtype, shape, nbytes in self.entries[width]:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        path = self.out / f".shard-{len(self.shards)}.safetensors"
        with open(path, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for width in sorted(self.parts, reverse=True):
                part = self.parts[width]
                part.seek(0)
                while chunk := part.read(8 * 1024 * 1024):
                    f.write(chunk)
                part.close()
                os.unlink(part.name)
        self.shards.append({"path": path, "names": [n for e in self.entries.values() for n, *_ in e]})
        self.total += offset
        self._open()

    def close(self, total_parameters: int) -> None:
        """Name the shards as save_pretrained does (model.safetensors, or model-0000i-of-0000n.safetensors with
        model.safetensors.index.json)."""
        self._finish()
        count = len(self.shards)
        if count == 1:
            self.shards[0]["path"].rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, shard in enumerate(self.shards, 1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            shard["path"].rename(self.out / name)
            weight_map.update(dict.fromkeys(shard["names"], name))
        index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                                encoding="utf-8")
