"""The QLoRA proof: a saved 4-bit folder reloads, takes LoRA adapters and trains for a few steps.

`qlora_check` is a top-level function with plain arguments, so a ZeroGPU Space can run it in a GPU window.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from .errors import QuantizeError

LEARNING_RATE = 1e-3     # large enough that a few steps move the held-out loss
LORA_RANK = 8
LORA_PARAM_BYTES = 16    # per LoRA parameter: fp32 weight, its gradient and AdamW's two moments
RUNTIME_BYTES = 512 * 1024**2   # the training step's own scratch beyond what is counted (allocator, kernels)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QLoRAResult:
    trainable_parameters: int   # LoRA parameters
    total_parameters: int       # all parameters of the wrapped model (4-bit ones counted as stored)
    steps: int
    seqlen: int
    loss_before: float          # on the held-out block, before the first step
    loss_after: float           # on the same block, after the last step
    target_modules: list[str]
    lora_tensors: int           # LoRA weight tensors (an A and a B per adapted layer)...
    lora_tensors_with_gradient: int   # ...of which this many received a non-zero gradient
    compute_dtype: str          # what the 4-bit layers computed in during the check
    device: str
    seconds: float
    exclude_modules: str | None = None   # modules kept free of LoRA (a multimodal model's towers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_needed(footprint: int, unquantized_bytes: int, lora_parameters: int, seqlen: int, hidden: int,
                  intermediate: int, layers: int, heads: int, vocab: int, largest_layer: int) -> int:
    """Bytes the QLoRA check holds at its peak (batch of one, no gradient checkpointing): the 4-bit model as
    loaded, its 16-bit parts again (peft's prepare_model_for_kbit_training makes them fp32), the LoRA weights with
    gradients and AdamW state, the activations kept for the backward pass (fp32), the logits with their softmax
    and gradient, one layer's weight dequantized to fp32 with its gradient, and a fixed allowance."""
    per_layer = seqlen * (12 * hidden + 4 * intermediate) * 4 + 2 * heads * seqlen * seqlen * 4
    logits = 3 * seqlen * vocab * 4
    return (footprint + unquantized_bytes + LORA_PARAM_BYTES * lora_parameters + layers * per_layer + logits
            + 2 * 4 * largest_layer + RUNTIME_BYTES)


def available_memory(device: str) -> int:
    """Free memory of the device the check runs on: the GPU's free memory on CUDA, else the RAM the kernel
    says is available (MemAvailable: free plus what it can reclaim)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits(needed: int, device: str) -> str | None:
    """None when the check fits the device's free memory, else the one sentence saying why it is skipped."""
    from .report import format_size

    free = available_memory(device)
    if needed <= free:
        return None
    where = "GPU memory" if device.startswith("cuda") else "RAM"
    return (f"The QLoRA check needs about {format_size(needed)} (the 4-bit model, its 16-bit parts in fp32, the "
            f"LoRA weights with their optimizer state and the activations), more than the {format_size(free)} of "
            f"free {where} on {device}, so it was skipped; the checkpoint itself is complete.")


def qlora_check(folder: str, blocks: list[list[int]], target_modules: list[str], steps: int,
                device: str, exclude_modules: str | None = None, needed_bytes: int | None = None) -> dict[str, Any]:
    """Reload `folder`, wrap it with peft and run `steps` AdamW steps on blocks[1:], measuring the loss on
    blocks[0] before and after. QuantizeError when a loss is not finite or no LoRA weight got a gradient.
    `exclude_modules` (a regex) keeps LoRA off a multimodal model's towers, which share layer names (q_proj...)
    with the language model. With `needed_bytes` (memory_needed), a check that does not fit the free memory of
    `device` is not run: {"skipped": why}. It is measured here, on the device, because on ZeroGPU only this
    function runs where the GPU is."""
    if needed_bytes is not None:
        why = fits(needed_bytes, device)
        if why:
            log.warning(why)
            return {"skipped": why}
    import torch
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if len(blocks) < 2:
        raise QuantizeError("The QLoRA check needs at least two calibration blocks; give a longer calibration text.")
    started = time.perf_counter()
    torch.manual_seed(0)
    model = load_4bit(folder, device)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise QuantizeError(f"{folder} reloaded without any 4-bit layer; the checkpoint is not a bitsandbytes 4-bit one.")
    keep_trainable(layers)
    if device == "cpu":
        # bitsandbytes' CPU backend emulates bf16 matmuls (about 10x slower in the backward pass) unless the CPU
        # has AVX512-BF16, so elsewhere the check computes in float32; the stored 4-bit weights are the same.
        dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
        for layer in layers:
            layer.compute_dtype = dtype
    compute_dtype = str(layers[0].compute_dtype).removeprefix("torch.")
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=list(target_modules),
                        exclude_modules=exclude_modules, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # peft calls a transformers API deprecated for v6
        # Gradient checkpointing only saves memory; the few steps here do not need it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    if not lora:
        raise QuantizeError(f"peft found none of {', '.join(target_modules)} in {folder}; no LoRA adapter was made.")
    data = torch.tensor(blocks, dtype=torch.long, device=device)
    held, train = data[:1], data[1:]
    optimizer = torch.optim.AdamW(lora, lr=LEARNING_RATE)

    loss_before = _held_loss(model, held)
    model.train()
    _require_trainable_layout(layers)
    with_gradient: set[int] = set()
    for step in range(steps):
        batch = train[step % len(train)].unsqueeze(0)
        loss = model(input_ids=batch, labels=batch).loss
        _require_finite(loss.item(), f"training step {step + 1}")
        loss.backward()
        # LoRA's B starts at zero, so A's gradient is zero on the first step; count over all steps.
        with_gradient |= {i for i, p in enumerate(lora) if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not with_gradient:
        raise QuantizeError("No LoRA weight received a gradient during the QLoRA check; the 4-bit model does "
                            "not train as saved.")
    loss_after = _held_loss(model, held)
    return QLoRAResult(
        trainable_parameters=int(trainable), total_parameters=int(total), steps=steps, seqlen=len(blocks[0]),
        loss_before=loss_before, loss_after=loss_after, target_modules=list(target_modules),
        lora_tensors=len(lora), lora_tensors_with_gradient=len(with_gradient),
        compute_dtype=compute_dtype, device=device, seconds=round(time.perf_counter() - started, 2),
        exclude_modules=exclude_modules,
    ).to_dict()


def load_4bit(folder: str, device: str) -> Any:
    from .multimodal import load_lm

    return load_lm(folder, device_map={"": device})


def cpu_has_bf16() -> bool:
    """Whether bitsandbytes finds AVX512-BF16 on this CPU (its fast bf16 path; the same test it uses itself)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _packed(layer: Any) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def keep_trainable(layers: list[Any]) -> None:
    """Keep the 4-bit layers in the layout that has a backward pass.

    On an AVX512-BF16 CPU, bitsandbytes (0.50) rewrites a layer's weight, for good, into a CPU inference layout
    the first time the layer runs in eval mode on an input without grad; that layout has no backward, so LoRA
    layers around it lose their gradients. Switch the rewrite off for these layers and undo one already made.
    (Evaluation loads the checkpoint on its own and keeps the fast layout.)
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        if _packed(layer):
            data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
            layer.weight.data, layer.weight.quant_state = data, state
            layer.quant_state = state


def _require_trainable_layout(layers: list[Any]) -> None:
    packed = sum(_packed(layer) for layer in layers)
    if packed:
        raise QuantizeError(f"{packed} of {len(layers)} 4-bit layers are in bitsandbytes' CPU inference layout, "
                            "which cannot train; the QLoRA check would be meaningless.")


def _held_loss(model: Any, held: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        loss = float(model(input_ids=held, labels=held).loss.item())
    _require_finite(loss, "the held-out block")
    return loss


def _require_finite(loss: float, where: str) -> None:
    if not math.isfinite(loss):
        raise QuantizeError(f"The QLoRA check's loss on {where} is {loss}; the 4-bit model does not train "
                            "as saved (try compute_dtype bfloat16, or keep more modules unquantized).")
