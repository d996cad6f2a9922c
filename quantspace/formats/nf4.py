"""NF4 / FP4: a bitsandbytes 4-bit transformers checkpoint, proven to fine-tune with QLoRA before it ships.

The checkpoint is a folder at the repo root (config.json with its quantization_config, safetensors, the
source's tokenizer and generation config). Quantizing, evaluating and the QLoRA check are top-level functions
with plain arguments, run through `ctx.run_gpu` so a ZeroGPU Space can give them a GPU window.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..archs import LORA_ORDER
from ..archs import load_config
from ..errors import BadOptionError, QuantizeError, UnsupportedArchitectureError
from ..multimodal import (PROCESSOR_FILES, auto_class_name, is_multimodal, load_lm, text_config, tower_of,
                          tower_patterns, towers)
from ..qlora import LORA_RANK, memory_needed, qlora_check
from ..report import format_size
from . import Context, Option, Output, TensorStats, Tick, copy_source_files, pick_variants, run_directly

if TYPE_CHECKING:
    from ..evaluate import Metrics, Reference
    from ..report import Report

VARIANTS = {"NF4": "nf4", "FP4": "fp4"}    # variant → bnb_4bit_quant_type
BLOCK = 64                                  # bitsandbytes' 4-bit block size (one absmax per block)
# Per 4-bit layer beyond its data: the 256- and 16-entry fp32 code tables, the quant state, header entries.
LAYER_EXTRA_BYTES = 2000
TENSOR_HEADER_BYTES = 110                   # a tensor's entry in the safetensors JSON header

OPTIONS = (
    Option("double_quant", True, "quantize the 4-bit blocks' scales again (saves about 0.4 bits per weight)",
           label="Double quantization"),
    Option("compute_dtype", "bfloat16", "dtype the 4-bit layers compute in", choices=("bfloat16", "float16"),
           label="Compute dtype"),
    Option("skip_modules", "lm_head", "comma-separated module names that stay unquantized (empty: none)",
           label="Modules kept unquantized"),
    Option("qlora_check", True, "prove the checkpoint fine-tunes: reload it, add LoRA adapters, train a few steps",
           label="QLoRA check"),
    Option("qlora_steps", 8, "optimizer steps of the QLoRA check", minimum=1, label="QLoRA steps"),
    Option("qlora_seqlen", 128, "tokens per calibration block of the QLoRA check", minimum=16,
           label="QLoRA tokens per step"),
    Option("calib_dataset", "", "calibration text: a Hub dataset id[:file], or empty for the shipped text",
           label="Calibration dataset (Hub id)"),
)


def skip_list(value: str) -> list[str]:
    """The module names of the skip_modules option (an empty option quantizes every linear layer)."""
    return [n.strip() for n in value.split(",") if n.strip()]


def bnb_config(variant: str, options: dict[str, Any]) -> dict[str, Any]:
    """BitsAndBytesConfig arguments, plain data so they can cross into a GPU window."""
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": VARIANTS[variant],
        "bnb_4bit_use_double_quant": bool(options["double_quant"]),
        "bnb_4bit_compute_dtype": options["compute_dtype"],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_list(options["skip_modules"]),
    }


def quantize_folder(model_dir: str, out: str, config: dict[str, Any], device: str) -> dict[str, Any]:
    """Quantize `model_dir` on `device` and save the checkpoint to `out`; returns facts about the 4-bit model.

    On the CPU the checkpoint is written while the source is read, one tensor at a time (nf4_stream), so a model
    larger than memory quantizes; its files equal transformers' from_pretrained + save_pretrained on the CPU. On
    a GPU, and for a source whose tensor names transformers renames on load, transformers loads and saves it."""
    from ..nf4_stream import stream_quantize

    if device == "cpu":
        facts = stream_quantize(model_dir, out, config, device)
        if facts is not None:
            if not facts["quantized_layers"]:
                raise QuantizeError(f"bitsandbytes quantized no layer of {Path(model_dir).name}; nothing would be "
                                    "4-bit.")
            return {**facts, "streamed": True}
    return {**load_and_save(model_dir, out, config, device), "streamed": False}


def load_and_save(model_dir: str, out: str, config: dict[str, Any], device: str) -> dict[str, Any]:
    """transformers' way: load the whole model quantized on `device`, then save it."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, config["bnb_4bit_compute_dtype"])
    # Unquantized parts (embeddings, norms, skipped modules, a multimodal model's towers) are stored in the
    # compute dtype too.
    model = load_lm(model_dir, quantization_config=BitsAndBytesConfig(**config), dtype=dtype,
                    device_map={"": device})
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise QuantizeError(f"bitsandbytes quantized no layer of {Path(model_dir).name}; nothing would be 4-bit.")
    model.save_pretrained(out, safe_serialization=True)
    unquantized = sum(p.nelement() * p.element_size() for p in model.parameters()
                      if type(p).__name__ != "Params4bit")
    return {"memory_footprint_bytes": int(model.get_memory_footprint()), "quantized_layers": len(layers),
            "unquantized_bytes": int(unquantized)}


def evaluate_folder(folder: str, ref: "Reference", device: str, progress: Tick | None = None) -> "Metrics":
    """Load the saved checkpoint as a user would (transformers + bitsandbytes) and score it."""
    from ..evaluate import evaluate_torch_model

    model = load_lm(folder, device_map={"": device})
    return evaluate_torch_model(model, ref, progress)


class NF4:
    name = "nf4"
    library_name = "transformers"
    # The Hub's usual name for bitsandbytes 4-bit checkpoints (e.g. unsloth's `<model>-bnb-4bit` repos).
    suffix = "bnb-4bit"
    title = "bitsandbytes 4-bit"
    variants = tuple(VARIANTS)
    default_variants = ("NF4",)
    options = OPTIONS
    needs_gpu = False     # bitsandbytes has a CPU backend

    def unavailable(self) -> str | None:
        missing = [pkg for pkg in ("bitsandbytes", "peft") if not _importable(pkg)]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install {' '.join(missing)})."
        return None

    def check_architecture(self, config: dict[str, Any]) -> str | None:
        causal_lm(config)
        return None

    def check_source(self, config: dict[str, Any], variants: list[str]) -> None:
        self.check_architecture(config)

    def check_variants(self, variants: list[str]) -> list[str]:
        return pick_variants(self.name.upper(), variants, VARIANTS, one_per_run=True)

    def work_bytes(self, stats: TensorStats, variants: list[str], sizes: dict[str, int]) -> int:
        # Written to a scratch folder on the same disk, then moved in; while a shard is closed its data is on
        # disk twice (the streaming writer's scratch parts and the shard).
        from ..nf4_stream import SHARD_BYTES

        return min(max(sizes.values(), default=0), SHARD_BYTES)

    def estimate(self, stats: TensorStats, variants: list[str]) -> dict[str, int]:
        # With the default options (double quant, lm_head kept): 4 bits per quantized weight, one 8-bit absmax per
        # block and one fp32 absmax per 256 blocks, plus per layer its code tables and quant state (~2 KB with
        # the safetensors header entries). Embeddings, lm_head and 1-D tensors stay 16-bit. Without double
        # quant the file is about 4% larger (an fp32 absmax per block).
        quantized = [n for name, n in stats.matrix_params.items() if not _stays_16bit(name) and not tower_of(name)]
        sixteen = stats.total - sum(quantized)
        size = sum(n // 2 + n // BLOCK + 4 * -(-n // (BLOCK * 256)) + LAYER_EXTRA_BYTES for n in quantized)
        size += 2 * sixteen + TENSOR_HEADER_BYTES * (len(stats.shapes) - len(quantized))
        return {v: size for v in variants}

    def produce(self, model_dir: Path, out_dir: Path, name: str, variants: list[str], ctx: Context) -> list[Output]:
        variant = variants[0]
        opts = ctx.options
        config = bnb_config(variant, opts)
        _check_skip_modules(model_dir, config["llm_int8_skip_modules"])
        kept = tower_modules(model_dir)   # a multimodal model's towers and projector stay 16-bit
        config["llm_int8_skip_modules"] += tower_patterns(kept)
        # The calibration text is read before quantizing, so a bad dataset fails before the long work.
        calibration = _qlora_blocks(model_dir, opts, ctx.token) if opts["qlora_check"] else None
        # Everything is written to a scratch folder first; only a finished, checked checkpoint reaches out_dir.
        staging = Path(tempfile.mkdtemp(prefix="nf4-", dir=ctx.workdir))
        tick = ctx.stage(f"quantize {variant}")
        facts = ctx.run_gpu(quantize_folder, str(model_dir), str(staging), config, ctx.device)
        tick(1, 1)
        _copy_source_files(model_dir, staging)
        details: dict[str, Any] = {
            "quant_type": config["bnb_4bit_quant_type"],
            "double_quant": config["bnb_4bit_use_double_quant"],
            "compute_dtype": config["bnb_4bit_compute_dtype"],
            "skip_modules": skip_list(opts["skip_modules"]),
            "towers_16bit": kept,
            "auto_class": auto_class_name(load_config(model_dir)),
            **facts,
            "source_memory_footprint_bytes": _source_footprint(model_dir),
            "source_file_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
            "versions": _versions(),
            "lora_targets": lora_targets_of(model_dir),
        }
        if calibration is not None:
            source, blocks = calibration
            tick = ctx.stage("QLoRA check")
            needed = qlora_memory(model_dir, facts, details["lora_targets"], int(opts["qlora_seqlen"]))
            result = ctx.run_gpu(qlora_check, str(staging), blocks, details["lora_targets"], int(opts["qlora_steps"]),
                                 ctx.device, lora_exclude(kept), needed)
            # A check that does not fit the device's memory is skipped: {"skipped": why}.
            details["qlora"] = result if "skipped" in result else {**result, "calibration": source}
            tick(1, 1)
        return [_move_into(staging, out_dir, variant, details)]

    def runtime(self, ctx: Context) -> str:
        # evaluate runs where the format computes: inside the GPU window under ZeroGPU
        return f"the saved checkpoint (transformers + bitsandbytes, {'CUDA' if ctx.device == 'cuda' else 'CPU'})"

    def evaluate(self, output: Output, ref: "Reference", ctx: Context, tick: Tick) -> "Metrics":
        folder = str(output.path.parent)
        # A progress callback cannot cross into a GPU window; it only goes along when run here.
        progress = tick if ctx.run_gpu is run_directly else None
        return ctx.run_gpu(evaluate_folder, folder, ref, ctx.device, progress)

    def tags(self, variants: list[str]) -> list[str]:
        return ["bitsandbytes", "4-bit", *[v.lower() for v in variants], "qlora", "quantized"]

    def usage(self, repo_id: str | None, report: "Report") -> str:
        where = f'"{repo_id}"' if repo_id else '"."  # the folder this card is in'
        targets = lora_targets(report)
        details = (report.files[0].details or {}) if report.files else {}
        auto = details.get("auto_class") or "AutoModelForCausalLM"
        kept = details.get("towers_16bit") or []
        exclude = lora_exclude(kept)
        lora_line = f"                  target_modules={json.dumps(targets)})"
        if exclude:   # the towers have layers of the same names; LoRA goes on the language model only
            lora_line = (f"                  target_modules={json.dumps(targets)},\n"
                         f"                  exclude_modules={json.dumps(exclude)})")
        if kept:
            return multimodal_usage(where, auto, lora_line, kept)
        return "\n".join([
            "Needs `transformers`, `accelerate` and `bitsandbytes` (CUDA, or bitsandbytes' CPU backend); "
            "the quantization settings are read from `config.json`.",
            "",
            "### Inference",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model_id = {where}",
            'model = AutoModelForCausalLM.from_pretrained(model_id, device_map="auto")',
            "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
            "```",
            "",
            "### QLoRA fine-tuning (peft)",
            "```python",
            "from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training",
            "from transformers import AutoModelForCausalLM",
            "",
            f"model_id = {where}",
            'model = AutoModelForCausalLM.from_pretrained(model_id, device_map="auto")',
            "model = prepare_model_for_kbit_training(model)",
            "lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type=\"CAUSAL_LM\",",
            f"                  target_modules={json.dumps(targets)})",
            "model = get_peft_model(model, lora)",
            "model.print_trainable_parameters()",
            "# then train as usual, e.g. with transformers' Trainer or trl's SFTTrainer",
            "```",
        ])

    def card_notes(self, report: "Report") -> str:
        d = report.files[0].details or {}
        parts = []
        if "memory_footprint_bytes" in d:
            src, quant = d["source_memory_footprint_bytes"], d["memory_footprint_bytes"]
            parts += [
                "## Size and memory",
                "",
                "| | Files | In memory (loaded) |",
                "|---|---:|---:|",
                f"| source | {format_size(d['source_file_bytes'])} | {format_size(src)} |",
                f"| {report.files[0].variant} | {format_size(report.files[0].size_bytes)} | {format_size(quant)} "
                f"({100 * quant / max(1, src):.1f}% of the source) |",
                "",
                f"Settings: `{d['quant_type']}`, double quantization {'on' if d['double_quant'] else 'off'}, "
                f"compute dtype `{d['compute_dtype']}`, unquantized modules: "
                f"{', '.join(f'`{m}`' for m in d['skip_modules']) or 'none'}; {d['quantized_layers']} linear "
                f"layers are 4-bit ({_versions_line(d['versions'])}).",
            ]
            if report.evaluation is not None:
                parts += ["", "Accuracy above: the saved checkpoint loaded with transformers + bitsandbytes "
                          f"(computing in `{d['compute_dtype']}`), scored on the same token ids as the source."]
        if d.get("towers_16bit"):
            parts += ["", f"Multimodal: {', '.join(f'`{m}`' for m in d['towers_16bit'])} stay 16-bit (bitsandbytes "
                      "skips them); the language model is 4-bit. The accuracy above is the language model's, on "
                      "text only."]
        q = d.get("qlora")
        if q and "skipped" in q:
            parts += ["", "## QLoRA check", "", f"Not run: {q['skipped']}"]
        elif q:
            parts += [
                "",
                "## QLoRA check",
                "",
                f"After quantizing, QuantSpace reloaded the saved checkpoint, wrapped it with peft "
                f"(`prepare_model_for_kbit_training` + LoRA r={LORA_RANK} on {', '.join(f'`{t}`' for t in q['target_modules'])}) "
                f"and ran {q['steps']} AdamW steps on {q['seqlen']}-token blocks of calibration text "
                f"({q['calibration']}), on {q['device']} with the 4-bit layers computing in `{q['compute_dtype']}`.",
                "",
                "| Trainable (LoRA) parameters | Total parameters | Loss before | Loss after | Seconds |",
                "|---:|---:|---:|---:|---:|",
                f"| {q['trainable_parameters']:,} ({100 * q['trainable_parameters'] / max(1, q['total_parameters']):.2f}%) "
                f"| {q['total_parameters']:,} | {q['loss_before']:.4f} | {q['loss_after']:.4f} | {q['seconds']:.1f} |",
                "",
                f"Both losses are on the same held-out block, which the steps never trained on; "
                f"{q['lora_tensors_with_gradient']} of {q['lora_tensors']} LoRA weight tensors received non-zero "
                "gradients.",
            ]
        elif d:
            parts += ["", "## QLoRA check", "", "Not run for this upload (`--qlora-check false`)."]
        return "\n".join(parts)


def multimodal_usage(where: str, auto: str, lora_line: str, kept: list[str]) -> str:
    return "\n".join([
        "Needs `transformers`, `accelerate` and `bitsandbytes` (CUDA, or bitsandbytes' CPU backend); the "
        f"quantization settings are read from `config.json`, which keeps {', '.join(f'`{m}`' for m in kept)} "
        "16-bit.",
        "",
        "### Inference (text and images)",
        "```python",
        f"from transformers import {auto}, AutoProcessor",
        "",
        f"model_id = {where}",
        f'model = {auto}.from_pretrained(model_id, device_map="auto")',
        "processor = AutoProcessor.from_pretrained(model_id)",
        'messages = [{"role": "user", "content": [{"type": "image", "url": "photo.jpg"},',
        '                                         {"type": "text", "text": "Describe this image."}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
        '                                       return_dict=True, return_tensors="pt").to(model.device)',
        "print(processor.decode(model.generate(**inputs, max_new_tokens=40)[0]))",
        "```",
        "",
        "### QLoRA fine-tuning of the language model (peft)",
        "```python",
        "from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training",
        f"from transformers import {auto}",
        "",
        f"model_id = {where}",
        f'model = {auto}.from_pretrained(model_id, device_map="auto")',
        "model = prepare_model_for_kbit_training(model)",
        "lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type=\"CAUSAL_LM\",",
        lora_line,
        "model = get_peft_model(model, lora)",
        "model.print_trainable_parameters()",
        "```",
    ])


def lora_targets(report: "Report") -> list[str]:
    details = (report.files[0].details or {}) if report.files else {}
    q = details.get("qlora")
    return list(q["target_modules"] if q and "target_modules" in q else details.get("lora_targets") or [])


# config.json keys giving a mixture of experts' expert count.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def causal_lm(config: dict[str, Any]) -> str:
    """The transformers class AutoModelForCausalLM (or, for a multimodal model, AutoModelForImageTextToText)
    makes of this config (never remote code), or UnsupportedArchitectureError saying why not."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    shown = ", ".join(config.get("architectures") or []) or f"model_type={model_type}"
    if any(int(text_config(config).get(key) or 0) > 1 for key in EXPERT_COUNT_KEYS):
        raise UnsupportedArchitectureError(
            f"{shown} is a mixture of experts: transformers {transformers.__version__} holds its experts as fused "
            "3-D tensors, which bitsandbytes does not quantize, so most of the model would stay 16-bit. GGUF "
            "quantizes every expert (and AWQ does for Qwen3-MoE and Mixtral).")
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    if is_multimodal(config):
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        # Its towers stay 16-bit and its language model is quantized; transformers must load it with its
        # language-model head.
        cls = cls or (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type) if isinstance(model_type, str)
                      else None)
        if cls is None:
            raise UnsupportedArchitectureError(
                f"{shown} is multimodal and neither AutoModelForCausalLM nor AutoModelForImageTextToText of "
                f"transformers {transformers.__version__} loads it without remote code; NF4 cannot make it.")
        return cls
    if cls is None:
        remote = " (its code lives in the repo, which is never run)" if config.get("auto_map") else ""
        raise UnsupportedArchitectureError(
            f"{shown} is not a causal LM that transformers {transformers.__version__} knows{remote}; NF4 takes "
            "any model AutoModelForCausalLM loads without remote code.")
    return cls


def lora_targets_of(model_dir: Path) -> list[str]:
    """LoRA targets: every linear layer inside the decoder layers (2-D weights under a numbered block), by
    name, as peft matches them; embeddings, the LM head, norms and a multimodal model's towers (excluded by
    `lora_exclude`) are not targets."""
    from ..weights import all_entries

    names = set()
    for e in all_entries(model_dir):
        if tower_of(e.name):
            continue
        parts = e.name.split(".")
        if len(e.shape) == 2 and parts[-1] == "weight" and any(p.isdigit() for p in parts[:-2]):
            names.add(parts[-2])
    known = {name: i for i, name in enumerate(LORA_ORDER)}
    return sorted(names, key=lambda n: (known.get(n, len(known)), n))


def qlora_memory(model_dir: Path, facts: dict[str, Any], targets: list[str], seqlen: int) -> int:
    """Bytes the QLoRA check needs at its peak (qlora.memory_needed), from the saved model's facts, the source's
    layer shapes and its config."""
    from ..weights import all_entries

    cfg = text_config(load_config(model_dir))
    lora = largest = 0
    for e in all_entries(model_dir):
        if len(e.shape) != 2 or tower_of(e.name) or not e.name.endswith(".weight"):
            continue
        largest = max(largest, e.n_elements)
        parts = e.name.split(".")
        if parts[-2] in targets and any(p.isdigit() for p in parts[:-2]):
            lora += LORA_RANK * (e.shape[0] + e.shape[1])
    hidden = int(cfg.get("hidden_size") or 0)
    return memory_needed(
        footprint=int(facts["memory_footprint_bytes"]), unquantized_bytes=int(facts.get("unquantized_bytes", 0)),
        lora_parameters=lora, seqlen=seqlen, hidden=hidden,
        intermediate=int(cfg.get("intermediate_size") or 4 * hidden), layers=int(cfg.get("num_hidden_layers") or 0),
        heads=int(cfg.get("num_attention_heads") or 0), vocab=int(cfg.get("vocab_size") or 0), largest_layer=largest)


def tower_modules(model_dir: Path) -> list[str]:
    """A multimodal checkpoint's tower and projector modules (e.g. vision_tower, multi_modal_projector)."""
    from ..weights import all_entries

    return towers([e.name for e in all_entries(model_dir)]) if is_multimodal(load_config(model_dir)) else []


def lora_exclude(kept: list[str]) -> str | None:
    """peft's exclude_modules for the towers (a full-match regex), so that LoRA targets the language model only."""
    return "|".join(tower_patterns(kept)) or None


def _stays_16bit(tensor: str) -> bool:
    return "embed_tokens" in tensor or tensor.endswith("lm_head.weight") or not tensor.endswith(".weight")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _qlora_blocks(model_dir: Path, opts: dict[str, Any], token: str | None) -> tuple[str, list[list[int]]]:
    """(calibration source, token blocks): one held-out block and one per training step."""
    from ..calib import calibration_blocks

    return calibration_blocks(model_dir, int(opts["qlora_steps"]) + 1, int(opts["qlora_seqlen"]),
                              opts["calib_dataset"], token)


def _check_skip_modules(model_dir: Path, names: list[str]) -> None:
    """Each skipped name must match a layer of this model (as transformers matches it: a prefix of the full
    name, a regex, or its end), or the user's intent would silently do nothing."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from ..weights import all_entries

    layers = {e.name.rsplit(".", 1)[0] for e in all_entries(model_dir) if len(e.shape) == 2}
    if load_config(model_dir).get("tie_word_embeddings"):
        layers.add("lm_head")     # tied: no tensor of its own, but a layer all the same
    try:
        unknown = [n for n in names if all(should_convert_module(layer, [n]) for layer in layers)]
    except re.error as exc:
        raise BadOptionError(f"skip_modules has a malformed pattern ({exc}); use plain names like lm_head.") from None
    if unknown:
        raise BadOptionError(f"skip_modules names no layer of this model: {', '.join(unknown)} "
                             "(use names like lm_head, down_proj or model.layers.0.mlp).")


def _copy_source_files(model_dir: Path, staging: Path) -> None:
    """The tokenizer and the generation config exactly as the source has them; no generation config when the
    source has none (transformers writes a default one)."""
    (staging / "generation_config.json").unlink(missing_ok=True)
    copy_source_files(model_dir, staging)
    for name in PROCESSOR_FILES:   # a multimodal model's image/audio settings, for AutoProcessor
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, staging / name)



def _source_footprint(model_dir: Path) -> int:
    """Bytes the source's tensors take in memory in their stored dtype (what transformers loads by default)."""
    from ..weights import all_entries

    return sum(e.nbytes for e in all_entries(model_dir))


def _versions() -> dict[str, str]:
    import importlib.metadata

    return {pkg: importlib.metadata.version(pkg) for pkg in ("bitsandbytes", "peft", "accelerate")}


def _versions_line(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def _move_into(staging: Path, out_dir: Path, variant: str, details: dict[str, Any]) -> Output:
    """Move the finished checkpoint into out_dir; weights first in the Output so `path` is the main file."""
    files = sorted(p for p in staging.iterdir() if p.is_file())
    moved = [Path(shutil.move(p, out_dir / p.name)) for p in files]
    weights = tuple(p for p in moved if p.suffix == ".safetensors")
    extra = tuple(p for p in moved if p.suffix != ".safetensors")
    shutil.rmtree(staging, ignore_errors=True)
    return Output(variant, weights, extra, details)
