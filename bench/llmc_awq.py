"""llm-compressor's AWQ (int4 asymmetric, group G) on the CPU, saved as a dense dequantized HF folder; JSON on stdout.

    LLMC_VENV/bin/python bench/llmc_awq.py --model MODEL_DIR --tokens calib_tokens.json --out OUT_DIR

Runs in a venv with llmcompressor (it pins another transformers than ours); bench/bench_awq_quality.py starts it
with the token blocks our AWQ calibrates on. The model runs in float32 on the CPU, as our AWQ does there. After
`oneshot` the quantized Linears keep their (AWQ-smoothed) weight plus weight_scale / weight_zero_point and
fake-quantize on the fly; OUT_DIR gets those weights quantized and dequantized, (q − z)·s, as plain float32, with
a config without quantization_config and the tokenizer files, so our evaluator loads it like any model. The same
weights are checked against llm-compressor's own pack-quantized compress → decompress round trip.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch


def recipe(group: int) -> list[Any]:
    """AWQ smoothing + W4 asymmetric group quantization of every Linear except lm_head (W4A16_ASYM, group G)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    # What the deprecated AWQModifier(ignore=..., config_groups=..., targets=...) expands to.
    return [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]


def allow_cpu_only() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster host → GPU copies; with a CPU-only torch,
    pin_memory() raises "Cannot access accelerator device when none is available". Pinning changes no value,
    so without an accelerator it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def dequantized_weights(model: Any) -> dict[str, torch.Tensor]:
    """Each quantized Linear's weight as its checkpoint stores it, quantized then dequantized."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    out = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            out[name] = forward_quantize(module, module.weight.data, "weight", scheme.weights).clone()
    return out


def check(model_dir: Path, model: Any, deq: dict[str, torch.Tensor], group: int) -> dict[str, Any]:
    """Dequantized weights differ from the source, hold ≤ 16 values per group, and match llm-compressor's own
    compress → decompress round trip."""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM

    source = dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters())
    most_levels, changed = 0, 0
    for name, w in deq.items():
        groups = w.reshape(-1, group)
        levels = max(len(torch.unique(g)) for g in groups[:: max(1, len(groups) // 64)])
        most_levels = max(most_levels, levels)
        changed += int(not torch.equal(w, source[name + ".weight"]))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    compressor.decompress_model(model)
    roundtrip = max(float((dict(model.named_modules())[n].weight.data.float() - w).abs().max())
                    for n, w in deq.items())
    return {"quantized_linears": len(deq), "changed_from_source": changed, "max_levels_per_group": most_levels,
            "max_abs_diff_vs_compress_decompress": roundtrip}


def save_dense(model_dir: Path, model: Any, deq: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not k.endswith(("_scale", "_zero_point", "_g_idx"))}
    for name, w in deq.items():
        state[name + ".weight"] = w.float().contiguous()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")) or f.suffix in (".model",):
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main() -> int:
    p = argparse.ArgumentParser(description="llm-compressor AWQ on the CPU → dense dequantized HF folder.")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--tokens", type=Path, required=True, help="JSON list of equal-length token id lists")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--group", type=int, default=64)
    args = p.parse_args()
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    allow_cpu_only()
    tokens = json.loads(args.tokens.read_text())
    data = Dataset.from_dict({"input_ids": tokens, "attention_mask": [[1] * len(t) for t in tokens]})
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    oneshot(model=model, dataset=data, recipe=recipe(args.group), max_seq_length=len(tokens[0]),
            num_calibration_samples=len(tokens))
    oneshot_s = time.perf_counter() - t0
    deq = dequantized_weights(model)
    save_dense(args.model, model, deq, args.out)
    result = {"oneshot_s": round(oneshot_s, 2), "threads": torch.get_num_threads(),
              "calibration": f"{len(tokens)} x {len(tokens[0])}", "group_size": args.group,
              "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                           "transformers": transformers.__version__, "torch": torch.__version__},
              "check": check(args.model, model, deq, args.group)}
    (args.out / "llmc_awq.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
